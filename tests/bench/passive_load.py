"""Load generator for ``bench_passive``: one process holding many passive QUIC connections to one
active node, each behaving like a passive node's route refresher.

Run as ``python -m tests.bench.passive_load HOST PORT NODE_ID MESH_ID SECRET_HEX``. It reads one JSON
command per line on stdin and answers one JSON line on stdout per command:

- ``{"cmd": "connect", "n": N, "concurrency": C}``: open N more connections (C handshakes at a time);
  on each, one ROUTE_REQUEST stream carrying Hello + RouteRequest, answered by Hello + RouteTable.
- ``{"cmd": "refresh", "spread_s": S}``: every open connection sends another ROUTE_REQUEST stream
  (RouteRequest only: the connection is already authenticated) at a uniformly random moment within
  S seconds (0: all at once); answers every latency in ms, send to RouteTable decoded.
- ``{"cmd": "arm", "pull_spread_s": S}``: forget the notices seen so far; from now on each death
  notice (PEER_DOWN stream) is read like a passive node does: the table pushed after it, if any, is
  taken; without one the connection asks for the table at a random moment within S seconds (what
  a passive node did before tables came with notices). Answers at once.
- ``{"cmd": "notices", "timeout_s": T}``: wait (up to T) until every open connection has had a
  notice and any table it then asked for; answers per notice the wall-clock time it arrived, whether
  a table came with it, and the latency of the route request it made instead (ms, or null).
- ``{"cmd": "status"}``, ``{"cmd": "close"}`` (closes every connection and exits).

Every connection is pinged every ``PING_INTERVAL_S`` (staggered) so the node's 60 s idle timeout
never closes it between phases. Each connection has its own UDP socket, as aioquic's ``connect``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import ssl
import sys
import time
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from meshllm.net.endpoint import ALPN
from meshllm.wire.admission import make_hello
from meshllm.wire.codec import CodecError
from meshllm.wire.framing import StreamKind, pack_frame, pack_stream_start, read_frame, read_frame_as
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import InviteToken
from meshllm.wire.messages import Ack, Hello, PeerDown, RouteRequest, RouteTable

PING_INTERVAL_S = 20.0
REQUEST_TIMEOUT_S = 30.0


async def _pushed_routes(reader: asyncio.StreamReader) -> RouteTable | None:
    """The table after a notice (newer active nodes), or None when the stream ends after it; kept
    here rather than imported, so that the load runs against older nodes' code too."""
    try:
        frame = await asyncio.wait_for(read_frame(reader), 2.0)
    except (TimeoutError, CodecError):
        return None
    return frame if isinstance(frame, RouteTable) else None


class Client(QuicConnectionProtocol):
    """One passive connection; remembers whether QUIC closed it, and reads the death notices the
    active node pushes (when its load is armed)."""

    def __init__(self, quic: QuicConnection, load: Load, **kw: Any) -> None:
        super().__init__(quic, stream_handler=self._on_stream, **kw)
        self.load = load
        self.terminated: str | None = None
        self.transport_: asyncio.DatagramTransport | None = None

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.load.tasks.add(asyncio.ensure_future(self.load.on_notice(self, reader, writer)))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event.reason_phrase or f"error {event.error_code}"
        super().quic_event_received(event)


class Load:
    def __init__(self, host: str, port: int, token: InviteToken) -> None:
        self.addr = (host, port)
        self.node_id = token.node_id
        self.token = token
        self.clients: list[Client] = []
        self._pinger: asyncio.Task[None] | None = None
        self.armed = False
        self.pull_spread_s = 2.0
        self.notices: list[dict[str, Any]] = []
        self.tasks: set[asyncio.Future[Any]] = set()

    @property
    def open(self) -> list[Client]:
        return [c for c in self.clients if c.terminated is None]

    async def _route_request(self, client: Client, hello: Hello | None) -> float:
        started = time.perf_counter()
        reader, writer = await client.create_stream()
        msgs = (hello, RouteRequest()) if hello is not None else (RouteRequest(),)
        writer.write(pack_stream_start(StreamKind.ROUTE_REQUEST, *msgs))
        writer.write_eof()
        if hello is not None:
            await read_frame_as(reader, Hello)
        await read_frame_as(reader, RouteTable)
        return (time.perf_counter() - started) * 1000.0

    async def _connect_one(self) -> float:
        loop = asyncio.get_running_loop()
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            verify_mode=ssl.CERT_NONE,
            idle_timeout=120.0,
            server_name=self.node_id,
        )
        client = Client(QuicConnection(configuration=config), self)
        transport, _ = await loop.create_datagram_endpoint(lambda: client, local_addr=("127.0.0.1", 0))
        client.transport_ = transport
        try:
            client.connect(self.addr)
            await asyncio.wait_for(client.wait_connected(), REQUEST_TIMEOUT_S)
            identity = NodeIdentity.generate()
            hello = make_hello(identity, self.token.mesh_id, self.token.grant, "client", self.node_id)
            ms = await asyncio.wait_for(self._route_request(client, hello), REQUEST_TIMEOUT_S)
        except BaseException:
            client.close()
            transport.close()
            raise
        self.clients.append(client)
        return ms

    async def connect(self, n: int, concurrency: int) -> dict[str, Any]:
        sem = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        first_ms: list[float] = []

        async def one() -> None:
            async with sem:
                try:
                    first_ms.append(await self._connect_one())
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        if self._pinger is None:
            self._pinger = asyncio.ensure_future(self._keepalive())
        # The connections live until the end: keep the cyclic GC from walking them again and again
        # (a full collection over 500 connections' objects would stall this process's loop).
        gc.collect()
        gc.freeze()
        return {
            "open": len(self.open),
            "failed": len(errors),
            "errors": errors[:5],
            "seconds": time.monotonic() - started,
            "first_request_ms": first_ms,
        }

    async def refresh(self, spread_s: float) -> dict[str, Any]:
        errors: list[str] = []
        latencies: list[float] = []
        late_ms: list[float] = []  # how much later than planned this process sent each request

        base = time.perf_counter()

        async def one(client: Client) -> None:
            due = random.uniform(0, spread_s) if spread_s > 0 else 0.0
            if due:
                await asyncio.sleep(due)
            late_ms.append((time.perf_counter() - base - due) * 1000.0)
            try:
                latencies.append(await asyncio.wait_for(self._route_request(client, None), REQUEST_TIMEOUT_S))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        cpu = time.process_time()
        started = time.monotonic()
        await asyncio.gather(*(one(c) for c in self.open))
        return {
            "latencies_ms": latencies,
            "failed": len(errors),
            "errors": errors[:5],
            "seconds": time.monotonic() - started,
            "load_cpu_s": time.process_time() - cpu,
            "open": len(self.open),
            "late_ms": late_ms,
        }

    async def on_notice(
        self, client: Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A stream the active node opened: a death notice is read as a passive node reads it."""
        try:
            kind = await reader.readexactly(1)
            if kind[0] != StreamKind.PEER_DOWN:
                return
            await read_frame_as(reader, PeerDown)
            arrived = time.time()
            routes = await _pushed_routes(reader)
            writer.write(pack_frame(Ack()))
            writer.write_eof()
        except Exception:
            return
        if not self.armed:
            return
        record: dict[str, Any] = {"t": arrived, "pushed": routes is not None, "pull_ms": None, "error": None}
        self.notices.append(record)
        if routes is None:  # an older active node: ask for the table, spread like a passive router
            await asyncio.sleep(random.uniform(0, self.pull_spread_s))
            try:
                ms = await asyncio.wait_for(self._route_request(client, None), REQUEST_TIMEOUT_S)
                record["pull_ms"] = ms
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"

    def arm(self, pull_spread_s: float) -> dict[str, Any]:
        self.notices = []
        self.pull_spread_s = pull_spread_s
        self.armed = True
        return {"armed": len(self.open)}

    async def wait_notices(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s

        def done() -> bool:
            settled = all(r["pushed"] or r["pull_ms"] is not None or r["error"] for r in self.notices)
            return len(self.notices) >= len(self.open) and settled

        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.armed = False
        self.tasks = {t for t in self.tasks if not t.done()}
        return {"open": len(self.open), "notices": self.notices}

    async def _keepalive(self) -> None:
        while True:
            clients = self.open
            if not clients:
                await asyncio.sleep(1.0)
                continue
            gap = PING_INTERVAL_S / len(clients)
            for client in clients:
                if client.terminated is None:
                    client._quic.send_ping(0)  # no waiter: the ack is enough to keep it alive
                    client.transmit()
                await asyncio.sleep(gap)

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        for client in self.clients:
            client.close()
        for client in self.clients:
            if client.transport_ is not None:
                client.transport_.close()


async def main(argv: list[str]) -> None:
    host, port, token_text = argv
    load = Load(host, int(port), InviteToken.decode(token_text))
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "connect":
            reply = await load.connect(int(cmd["n"]), int(cmd.get("concurrency", 16)))
        elif cmd["cmd"] == "refresh":
            reply = await load.refresh(float(cmd.get("spread_s", 0.0)))
        elif cmd["cmd"] == "arm":
            reply = load.arm(float(cmd.get("pull_spread_s", 2.0)))
        elif cmd["cmd"] == "notices":
            reply = await load.wait_notices(float(cmd.get("timeout_s", 30.0)))
        elif cmd["cmd"] == "status":
            reply = {"open": len(load.open), "cpu_s": time.process_time()}
        elif cmd["cmd"] == "close":
            load.close()
            await asyncio.sleep(0.2)  # let the CONNECTION_CLOSE frames go out
            sys.stdout.write(json.dumps({"closed": True}) + "\n")
            sys.stdout.flush()
            break
        else:
            reply = {"error": f"unknown command {cmd['cmd']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
