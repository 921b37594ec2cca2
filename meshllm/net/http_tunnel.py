"""HTTP over the mesh: the host side of an HTTP tunnel stream, and the local llama-server call that
both the tunnel and the gateway use.

A tunnel stream is ``[HTTP_TUNNEL][TunnelRequest frame][request body ... FIN]`` one way and
``[TunnelResponse frame][response body ... FIN]`` (or a Refused frame) the other. Bodies are raw
bytes passed through as they come, so streamed (SSE) answers keep their pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import aiohttp

from actors.base import Directory
from meshllm.logsetup import Logger
from meshllm.net.local_route import local_route
from meshllm.serving.demand import DemandCounter
from meshllm.wire.framing import pack_frame, read_frame_as
from meshllm.wire.messages import Hello, Refused, TunnelRequest, TunnelResponse

CHUNK = 65536
PASSED_HEADERS = ("content-type", "cache-control")


class UpstreamUnavailable(Exception):
    """The request never reached a working llama-server: safe to retry elsewhere."""


def new_session() -> aiohttp.ClientSession:
    # No total timeout: a long generation is not a failure. Connecting must be quick (loopback).
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    # A fresh loopback connection per request: llama-server closes idle keep-alive connections, and a
    # pooled one it has closed fails the next request with "Server disconnected".
    connector = aiohttp.TCPConnector(force_close=True)
    return aiohttp.ClientSession(timeout=timeout, auto_decompress=False, connector=connector)


def pass_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers worth passing on (the rest are hop-by-hop or recomputed)."""
    return {k: v for k, v in headers.items() if k.lower() in PASSED_HEADERS}


async def open_local(
    session: aiohttp.ClientSession, port: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> aiohttp.ClientResponse:
    """Send a request to the local llama-server; connection failures become UpstreamUnavailable."""
    try:
        return await session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, data=body)
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise UpstreamUnavailable(f"llama-server on port {port}: {exc}") from exc


class HttpTunnelServer:
    """Serves HTTP tunnel streams on the host: forwards each to the local llama-server of its model."""

    def __init__(self, directory: Directory, logger: Logger, demand: DemandCounter | None = None) -> None:
        self.directory = directory
        self.demand = demand or DemandCounter()
        self.log = logger.bind(actor="http-tunnel")
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, conn: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A QUIC HTTP tunnel stream: its header frame, then the same as the fast path."""
        await self.serve(await read_frame_as(reader, TunnelRequest), reader, writer)

    async def serve_fast(
        self, request: TunnelRequest, hello: Hello, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.serve(request, reader, writer)

    async def serve(
        self, request: TunnelRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward one tunnelled request to this node's llama-server for its model."""
        body = await (reader.readexactly(request.body_bytes) if request.body_bytes >= 0 else reader.read())
        route = await local_route(self.directory, request.model, self.log)
        port = route.local_port if route is not None else 0
        if port:
            self.demand.hit(request.model)
        if not port:
            writer.write(pack_frame(Refused(reason=f"model {request.model!r} is not served on this node")))
            return
        try:
            upstream = await open_local(
                self.session(), port, request.method, request.path, request.headers, body
            )
        except UpstreamUnavailable as exc:
            self.log.warning("tunnel.upstream_unavailable", model=request.model, reason=str(exc))
            writer.write(pack_frame(Refused(reason=str(exc))))
            return
        async with upstream:
            writer.write(
                pack_frame(TunnelResponse(status=upstream.status, headers=pass_headers(upstream.headers)))
            )
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for chunk in upstream.content.iter_any():
                    writer.write(chunk)
                    await writer.drain()
