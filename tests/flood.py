"""A flood of connections that never authenticate, run as its own process against one node port.

Why a separate process: the flood must not share a GIL with the test that measures the real
client's latency, nor with the nodes. It opens, in batches, TCP connections to the fast path (silent,
garbage, or a TLS handshake then half a frame) and QUIC connections that complete the handshake (our
Retry included) and then never send a Hello, each from one of the source addresses given (other
loopback addresses: 127.0.0.0/8 is all local on Linux). It prints ``{"flooding": ...}`` once every
connection has been tried, holds them for ``--hold`` seconds, then one JSON line of what the node did
to them: how many the node closed, how soon, how many completed their handshake, how many were still
open at the end.

Run: python -m tests.flood PORT --tcp 1000 --quic 1000 --sources 127.0.0.2,127.0.0.3 --hold 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState

from meshllm.net.endpoint import ALPN

BATCH = 100
MODES = ("silent", "garbage", "half_frame")


@dataclass
class Outcome:
    """What happened to one flood connection, in seconds from when it was opened."""

    kind: str
    opened: float = 0.0
    handshake_s: float | None = None  # TLS or QUIC handshake completed
    closed_s: float | None = None  # the node closed it
    error: str = ""


@dataclass
class Flood:
    host: str
    port: int
    sources: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    _keep: list[Any] = field(default_factory=list)

    def source(self, i: int) -> str:
        return self.sources[i % len(self.sources)]

    async def tcp(self, i: int) -> None:
        mode = MODES[i % len(MODES)]
        out = Outcome(f"tcp_{mode}", opened=time.monotonic())
        self.outcomes.append(out)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, local_addr=(self.source(i), 0)), 10
            )
        except (OSError, TimeoutError) as exc:
            out.error = f"connect: {type(exc).__name__}"
            return
        self._keep.append(writer)
        self._keep.append(asyncio.ensure_future(self._tcp_watch(out, mode, reader, writer)))

    async def _tcp_watch(
        self, out: Outcome, mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if mode == "garbage":
                writer.write(os.urandom(512))
            elif mode == "half_frame":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.set_alpn_protocols(["meshllm-fast/1"])
                await writer.start_tls(ctx)
                out.handshake_s = time.monotonic() - out.opened
                writer.write(b"\x00\x00\x02\x00" + b"\x81" * 100)  # 512 bytes announced, 100 sent
            while await reader.read(4096):
                pass
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        out.closed_s = time.monotonic() - out.opened

    async def quic(self, i: int) -> None:
        out = Outcome("quic_idle", opened=time.monotonic())
        self.outcomes.append(out)
        config = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE, idle_timeout=120.0
        )
        loop = asyncio.get_running_loop()
        proto = _Idle(QuicConnection(configuration=config), out)
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(self.source(i), 0))
        except OSError as exc:
            out.error = f"socket: {exc}"
            return
        self._keep.append((proto, transport))
        proto.connect((self.host, self.port))

    def close(self) -> None:
        for item in self._keep:
            if isinstance(item, tuple):
                item[0].close()
                item[1].close()
            elif isinstance(item, asyncio.Future):
                item.cancel()
            else:
                item.close()

    def report(self, outlive_s: float) -> dict[str, Any]:
        """Per kind of connection; ``outlived`` counts those whose handshake ended more than
        ``outlive_s`` ago and that the node has still not closed."""
        end = time.monotonic()
        by_kind: dict[str, dict[str, Any]] = {}
        for o in self.outcomes:
            k = by_kind.setdefault(
                o.kind,
                {"n": 0, "handshake": 0, "closed_by_node": 0, "open_at_end": 0, "outlived": 0, "errors": 0},
            )
            k["n"] += 1
            k["handshake"] += o.handshake_s is not None
            if o.handshake_s is not None and o.closed_s is None:
                k["outlived"] += end - (o.opened + o.handshake_s) > outlive_s
            k["errors"] += bool(o.error)
            if o.closed_s is not None:
                k["closed_by_node"] += 1
                k.setdefault("closed_s", []).append(round(o.closed_s, 2))
            elif not o.error:
                k["open_at_end"] += 1
        for k in by_kind.values():
            closed = sorted(k.pop("closed_s", []))
            if closed:
                k["closed_s_p50"] = closed[len(closed) // 2]
                k["closed_s_max"] = closed[-1]
        return by_kind


CLOSED_STATES = (QuicConnectionState.DRAINING, QuicConnectionState.TERMINATED)
"""A connection in these states has received the other side's close."""


class _Idle(QuicConnectionProtocol):
    """A QUIC connection that completes its handshake and then says nothing."""

    def __init__(self, quic: QuicConnection, out: Outcome) -> None:
        super().__init__(quic)
        self.out = out

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.out.handshake_s = time.monotonic() - self.out.opened
        elif isinstance(event, events.ConnectionTerminated) and self.out.closed_s is None:
            self.out.closed_s = time.monotonic() - self.out.opened
        super().quic_event_received(event)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        # The node's close counts when it arrives. aioquic reports ConnectionTerminated only after
        # draining for 3 probe timeouts, and on a machine this flood overloads the probe timeout grows
        # to seconds, so the event can come after the report (aioquic has no public connection state).
        if self.out.closed_s is None and self._quic._state in CLOSED_STATES:
            self.out.closed_s = time.monotonic() - self.out.opened


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--tcp", type=int, default=0)
    p.add_argument("--quic", type=int, default=0)
    p.add_argument("--tcp-sources", default="127.0.0.2")
    p.add_argument("--quic-sources", default="127.0.0.3")
    p.add_argument("--hold", type=float, default=10.0)
    p.add_argument("--outlive", type=float, default=5.0, help="see Flood.report")
    args = p.parse_args(argv)
    tcp = Flood(args.host, args.port, args.tcp_sources.split(","))
    quic = Flood(args.host, args.port, args.quic_sources.split(","))
    started = time.monotonic()
    for first in range(0, max(args.tcp, args.quic), BATCH):
        await asyncio.gather(
            *(tcp.tcp(i) for i in range(first, min(first + BATCH, args.tcp))),
            *(quic.quic(i) for i in range(first, min(first + BATCH, args.quic))),
        )
        await asyncio.sleep(0)  # let the batch's handshakes move
    opened_s = time.monotonic() - started
    print(json.dumps({"flooding": len(tcp.outcomes) + len(quic.outcomes), "opened_s": opened_s}), flush=True)
    await asyncio.sleep(args.hold)
    report = {
        "opened_s": round(opened_s, 2),
        "hold_s": args.hold,
        **tcp.report(args.outlive),
        **quic.report(args.outlive),
    }
    tcp.close()
    quic.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
