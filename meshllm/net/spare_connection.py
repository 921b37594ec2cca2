"""A loopback connection to a local llama-server, opened before the request that will use it.

Every request to llama-server goes on a new connection: llama-server closes one after a streamed
answer. A TCP connect on loopback costs ~0.2 ms in the kernel on these machines, ~0.6 ms through
asyncio, and that time came before llama-server saw the request, in each answer's time to first
token. So when a request to a port ends, the next connection to that port is opened at once and
kept until a request takes it.

A spare is not free for llama-server: each open connection holds one of its HTTP threads, and
cpp-httplib closes a connection that has sent nothing for 5 s (its keep-alive wait, which a
connection's first request gets too). Hence at most one spare per port, opened only when a request
ends (an idle node keeps none for long), given up after :data:`SPARE_MAX_AGE_S`, before llama-server
would close it, and never trusted: a spare found closed, or closed as the request went out, is
replaced by a new connection (:func:`meshllm.net.raw_http.open_upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

SPARE_MAX_AGE_S = float(os.environ.get("MESHLLM_SPARE_MAX_AGE_S", "3"))
"""How long a spare is kept unused (``MESHLLM_SPARE_MAX_AGE_S``; 0: no spares). Under llama-server's
5 s keep-alive wait, with room for a request that takes the spare just before it is given up."""

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, limit: int) -> Connection:
    """A plain TCP connection to ``127.0.0.1:port`` without Nagle's delay (a request goes in one
    write; small answers' chunks must not wait)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=limit)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


class SpareConnections:
    """Per llama-server port, at most one connection opened ahead of its request; lives on one event
    loop (every method is called from it)."""

    def __init__(self, limit: int, max_age_s: float = SPARE_MAX_AGE_S) -> None:
        self.limit = limit
        self.max_age_s = max_age_s
        self._spares: dict[int, tuple[Connection, asyncio.TimerHandle]] = {}
        self._opening: dict[int, asyncio.Task[None]] = {}
        self._closed = False

    def take(self, port: int) -> Connection | None:
        """The spare to ``port`` if there is one still open (its expiry keeps it young); the caller
        owns it."""
        entry = self._spares.pop(port, None)
        if entry is None:
            return None
        (reader, writer), expiry = entry
        expiry.cancel()
        if not reader.at_eof() and not writer.is_closing():
            return reader, writer
        writer.transport.abort()
        return None

    def replenish(self, port: int) -> None:
        """A request to ``port`` has ended: open the next connection in the background, unless one is
        there or on its way."""
        if self._closed or self.max_age_s <= 0 or port in self._spares or port in self._opening:
            return
        self._opening[port] = asyncio.ensure_future(self._open(port))

    def held(self, port: int) -> bool:
        """Whether a spare to ``port`` is open now (for tests)."""
        return port in self._spares

    async def _open(self, port: int) -> None:
        try:
            connection = await connect(port, self.limit)
        except OSError:
            return  # llama-server is gone or restarting: the next request finds out and says so
        finally:
            self._opening.pop(port, None)
        if self._closed or port in self._spares:
            connection[1].transport.abort()
            return
        expiry = asyncio.get_running_loop().call_later(self.max_age_s, self._expire, port)
        self._spares[port] = (connection, expiry)

    def _expire(self, port: int) -> None:
        """Give up a spare nobody took in time, so that it holds none of llama-server's threads (taking
        or closing a spare cancels its expiry, so this is always the port's current one)."""
        (_, writer), _ = self._spares.pop(port)
        writer.transport.abort()

    def close(self) -> None:
        """Close every spare and open no more (the node is stopping)."""
        self._closed = True
        for task in self._opening.values():
            task.cancel()
        for (_, writer), expiry in self._spares.values():
            expiry.cancel()
            writer.transport.abort()
        self._spares.clear()
