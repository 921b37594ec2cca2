"""The QUIC server socket of a node: aioquic's server with address validation (Retry) on, and every
connection it would create counted by the pre-admission guard (:mod:`meshllm.net.preauth`).

Why: without Retry, one spoofed UDP packet makes the server create a connection, run a TLS handshake
and send up to three times as many bytes back to an address that never asked (amplification), and
any per-address count would count addresses the sender made up. With Retry, the first Initial of a
connection is answered statelessly with a token; only an Initial that carries a valid token - the
sender received our Retry, so the address is real - creates a connection. Those are counted per
source and in all until they authenticate (a verified Hello on their first stream) or close; over the
caps their Initial is held in a bounded queue and replayed when a slot frees, so a legitimate burst
waits milliseconds instead of retransmitting after QUIC's backoff.

What it costs a dialler: one extra round trip before the handshake (measured by
tests/test_preauth.py::test_quic_retry_is_on_and_costs_one_round_trip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration

from meshllm.logsetup import Logger
from meshllm.net import library_internals
from meshllm.net.connection import MeshConnection
from meshllm.net.preauth import Limits, Verdict, source_key
from meshllm.net.preauth_guard import PreAuthGuard

MAX_HELD_DATAGRAMS = 4
"""Datagrams kept per queued attempt: its Initial and a few retransmissions (the rest are dropped)."""


@dataclass(eq=False)
class _Attempt:
    """A connection attempt waiting for a slot: its connection id and the datagrams held for it."""

    cid: bytes
    source: str
    datagrams: list[tuple[bytes, Any]] = field(default_factory=list)


class GuardedQuicServer(QuicServer):
    """aioquic's server, Retry on, with connections counted before admission."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        create_protocol: Callable[..., MeshConnection],
        log: Logger,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(configuration=configuration, create_protocol=create_protocol, retry=True)
        loop = asyncio.get_running_loop()
        self.guard: PreAuthGuard[_Attempt] = PreAuthGuard(
            "quic", log, loop, limits, on_expire=self._forget_attempt
        )
        self._waiting: dict[bytes, _Attempt] = {}

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        cid = library_internals.new_connection_attempt(self, data, addr)
        if cid is None:
            super().datagram_received(data, addr)
            return
        waiting = self._waiting.get(cid)
        if waiting is not None:  # a retransmission of an attempt that waits for a slot
            if len(waiting.datagrams) < MAX_HELD_DATAGRAMS:
                waiting.datagrams.append((data, addr))
            return
        attempt = _Attempt(cid, source_key(addr), [(data, addr)])
        verdict = self.guard.arrive(attempt.source, attempt)
        if verdict is Verdict.ADMIT:
            self._create([attempt])
        elif verdict is Verdict.QUEUE:
            self._waiting[cid] = attempt
        # REFUSE: dropped (counted and logged by the guard); the dialler's retransmission tries again.

    def _forget_attempt(self, attempt: _Attempt) -> None:
        self._waiting.pop(attempt.cid, None)

    def _create(self, attempts: list[_Attempt]) -> None:
        """Feed admitted attempts to aioquic, which creates their connections; each connection holds
        its slot until it authenticates or closes."""
        todo = list(attempts)
        while todo:
            attempt = todo.pop(0)
            self._waiting.pop(attempt.cid, None)
            for data, addr in attempt.datagrams:
                super().datagram_received(data, addr)
            proto = library_internals.server_protocol(self, attempt.cid)
            if isinstance(proto, MeshConnection) and not proto.terminated:
                proto.hold_preauth_slot(self._releaser(attempt.source), self.guard, attempt.source)
            else:  # nothing was created after all: the slot goes to the next in the queue
                self.guard.note("not_created", attempt.source)
                todo.extend(self.guard.release(attempt.source))

    def _releaser(self, source: str) -> Callable[[], None]:
        def release() -> None:
            admitted = self.guard.release(source)
            if admitted:  # not inside whatever aioquic call told us of the release
                self._loop.call_soon(self._create, admitted)

        return release
