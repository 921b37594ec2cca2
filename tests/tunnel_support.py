"""Helpers for driving the host side of an HTTP tunnel as a peer would: a fake llama-server that
records what reaches it, crafted tunnel streams, and the parsing of what the host answers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from actors.base import Directory
from meshllm.logsetup import make_logger
from meshllm.net.http_tunnel import HttpTunnelServer
from meshllm.wire.framing import pack_frame, read_frame_as
from meshllm.wire.messages import HostInfo, RouteReply, TunnelRequest, TunnelResponse
from tests.support import LogCapture

ANSWER = b'{"choices": []}'
# What the fake upstream answers besides its body: hop-by-hop headers that must not come back.
UPSTREAM_HEADERS = (
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-cache"),
    ("Connection", "close, X-Upstream-Private"),
    ("X-Upstream-Private", "secret"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Upgrade", "h2c"),
    ("Trailer", "X-Checksum"),
)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeUpstream:
    """A stand-in llama-server on loopback: records every request, answers 200 with hop-by-hop
    headers of its own."""

    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                upstream.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
                self.send_response(200)
                for name, value in UPSTREAM_HEADERS:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(ANSWER)))
                self.end_headers()
                self.wfile.write(ANSWER)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream()
    server = ThreadingHTTPServer(("127.0.0.1", 0), upstream.handler())
    upstream.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        server.shutdown()
        server.server_close()


def route_to(port: int) -> Any:
    """A replacement for the tunnel's ``local_route``: every model is served on ``port``."""

    async def route(directory: Directory, model: str, log: Any, route_now: Any = None) -> RouteReply:
        hosts: tuple[HostInfo, ...] = ()
        return RouteReply(model=model, known=True, local_port=port, hosts=hosts, available=(model,))

    return route


class Sink:
    """What the host side writes to: everything it sends, kept."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)["error"]
        return parsed


async def parse_answer(reader: asyncio.StreamReader) -> Answer:
    head = await read_frame_as(reader, TunnelResponse)
    return Answer(head.status, dict(head.headers), await reader.read())


def tunnel_request(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    body_bytes: int = -1,
    model: str = "tiny",
) -> TunnelRequest:
    if headers is None:
        headers = {"Content-Type": "application/json"}
    return TunnelRequest(model=model, method=method, path=path, headers=headers, body_bytes=body_bytes)


def drive(
    request: TunnelRequest, body: bytes = b"{}", eof: bool = True, timeout: float = 20
) -> tuple[Answer, LogCapture]:
    """Send one crafted tunnel stream (header frame, ``body``, then FIN when ``eof``) to a fresh
    HttpTunnelServer's QUIC handler and return what it answered and what it logged."""
    capture = LogCapture()
    server = HttpTunnelServer(Directory(), make_logger("host", stream=capture))

    async def run() -> Answer:
        reader = asyncio.StreamReader()
        reader.feed_data(pack_frame(request) + body)
        if eof:
            reader.feed_eof()
        sink = Sink()
        try:
            await server.handle(object(), reader, cast(asyncio.StreamWriter, sink))
        finally:
            await server.close()
        answer = asyncio.StreamReader()
        answer.feed_data(bytes(sink.data))
        answer.feed_eof()
        return await parse_answer(answer)

    return asyncio.run(asyncio.wait_for(run(), timeout)), capture

