"""HTTP over the mesh: the host side of an HTTP tunnel stream, and the local llama-server call that
both the tunnel and the gateway use.

A tunnel stream is ``[HTTP_TUNNEL][TunnelRequest frame][request body ... FIN]`` one way and
``[TunnelResponse frame][response body ... FIN]`` (or a Refused frame) the other. Bodies are raw
bytes passed through as they come, so streamed (SSE) answers keep their pacing.

A requester that says so (:data:`~meshllm.net.raw_http.FRAMED_HEADER`, every current gateway) gets
llama-server's body exactly as llama-server framed it (chunked, or a Content-Length; the
TunnelResponse's :data:`~meshllm.net.raw_http.BODY_HEADER` says which), read from a plain loopback
connection and never parsed beyond where its chunks end. On the fast path the connection then carries
the requester's next request (:meth:`HttpTunnelServer.serve_fast` returns True): one TCP+TLS
handshake per pooled connection instead of one per request. Older requesters get the body until FIN,
as before.

The host side is a door to llama-server for every member of the mesh, so it lets through only what
the gateway itself would pass on (:mod:`meshllm.serving.openai_api`: the proxied routes, the body and
header caps) and strips hop-by-hop headers both ways. Anything else gets an OpenAI-shaped error
response and a ``tunnel.refused`` log line, and never reaches llama-server; the caller then closes the
stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping

import aiohttp

from actors.base import Directory
from meshllm.logsetup import Logger
from meshllm.net.body_pump import pump_body, source_of
from meshllm.net.in_flight import InFlight
from meshllm.net.library_internals import abort_tunnel
from meshllm.net.local_route import RouteNow, local_route
from meshllm.net.misbehaviour import read_header
from meshllm.net.pump_result import PumpEnd
from meshllm.net.raw_http import (
    BODY_HEADER,
    FRAMED,
    FRAMED_HEADER,
    MAX_HEAD_BYTES,
    BadBody,
    Upstream,
    UpstreamError,
    first_bytes,
    open_upstream,
)
from meshllm.net.spare_connection import SpareConnections
from meshllm.net.thread_relay import stop_relaying
from meshllm.serving.demand import DemandCounter
from meshllm.serving.openai_api import (
    MAX_BODY_BYTES,
    Refusal,
    check_request,
    request_headers,
    response_headers,
)
from meshllm.serving.request_log import LLAMA_BROKE, REFUSED, REQUESTER_LEFT, WHOLE, RequestRecord
from meshllm.wire.framing import pack_frame
from meshllm.wire.messages import Hello, Refused, TunnelRequest, TunnelResponse

CHUNK = 65536
BODY_TIMEOUT_S = 30.0
"""A peer that announced a body must have sent all of it within this long."""


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
    return response_headers(headers)


async def open_local(
    session: aiohttp.ClientSession, port: int, method: str, path: str, headers: dict[str, str], body: bytes
) -> aiohttp.ClientResponse:
    """Send a request to the local llama-server; connection failures become UpstreamUnavailable."""
    try:
        return await session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, data=body)
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise UpstreamUnavailable(f"llama-server on port {port}: {exc}") from exc


async def read_body(reader: asyncio.StreamReader, declared: int) -> bytes | Refusal:
    """The request body: ``declared`` bytes, or up to the end of the stream when -1; never more than
    :data:`MAX_BODY_BYTES`, never waiting longer than :data:`BODY_TIMEOUT_S`."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            if declared >= 0:
                return await reader.readexactly(declared)
            body = bytearray()
            while chunk := await reader.read(CHUNK):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    return Refusal(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large")
            return bytes(body)
    except asyncio.IncompleteReadError as exc:
        return Refusal(400, f"body ended after {len(exc.partial)} of {declared} bytes", "body_incomplete")
    except TimeoutError:
        return Refusal(408, f"body not sent within {BODY_TIMEOUT_S:g} s", "body_timeout")
    except (ConnectionError, OSError) as exc:
        return Refusal(400, f"stream broke while reading the body: {exc}", "body_incomplete")


def _content_length_agrees(headers: Mapping[str, str], body: bytes) -> Refusal | None:
    for name, value in headers.items():
        if name.lower() == "content-length" and int(value) != len(body):  # a number: checked before
            return Refusal(400, f"Content-Length {value} but {len(body)} body bytes", "bad_content_length")
    return None


class HttpTunnelServer:
    """Serves HTTP tunnel streams on the host: forwards each to the local llama-server of its model."""

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        demand: DemandCounter | None = None,
        route_now: RouteNow | None = None,
    ) -> None:
        self.directory = directory
        self.route_now = route_now
        self.demand = demand or DemandCounter()
        self.log = logger.bind(actor="http-tunnel")
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = InFlight()
        self._answering: dict[asyncio.StreamWriter, RequestRecord] = {}
        """The tunnels with a request under way, and what each request has done so far (its
        ``tunnel.served`` line)."""
        self.draining = False
        self.spares = SpareConnections(limit=MAX_HEAD_BYTES)
        """Connections to this node's llama-servers opened ahead of requests, for the tunnel and the
        gateway alike."""

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (their requesters retry on another host, as before a first byte) and wait
        up to ``timeout_s`` for the ones under way to finish; returns how many were still running."""
        self.draining = True
        return await self.in_flight.wait_idle(timeout_s)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    async def close(self) -> None:
        """Reset the tunnels of answers still under way (a drain that ran out of time): their requesters
        must see a cut answer as an error, never as a normal end."""
        for writer in list(self._answering):
            stop_relaying(writer.transport)  # no relay thread may still use the connection's TLS
            abort_tunnel(writer)
        self.spares.close()
        if self._session is not None:
            await self._session.close()

    async def handle(self, conn: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A QUIC HTTP tunnel stream: its header frame, then the same as the fast path."""
        request = await read_header(reader, TunnelRequest)
        await self.serve(request, reader, writer, peer=getattr(conn, "peer_id", None))

    async def serve_fast(
        self, request: TunnelRequest, hello: Hello, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """A fast-path tunnel request; True when the connection may carry the requester's next one (a
        framed answer sent whole)."""
        return await self.serve(request, reader, writer, peer=hello.node_id, pumped=True)

    def _refuse(
        self, writer: asyncio.StreamWriter, request: TunnelRequest, refusal: Refusal, peer: str | None
    ) -> None:
        """Answer a request that goes no further with its error, and say why in the log."""
        self.log.warning(
            "tunnel.refused",
            peer=peer,
            model=request.model[:100],
            method=request.method[:20],
            path=request.path[:200],
            status=refusal.status,
            code=refusal.code,
            reason=refusal.message,
        )
        head = TunnelResponse(status=refusal.status, headers={"Content-Type": "application/json"})
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.write(pack_frame(head) + json.dumps(refusal.body()).encode())
        self._answered(writer, refusal.status)

    def _answered(self, writer: asyncio.StreamWriter, status: int) -> None:
        """The request on ``writer`` got its head and first bytes (written just now)."""
        record = self._answering[writer]  # serve() made it
        record.status = status
        record.first_byte()

    def _sent_back(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """Refuse the request on ``writer`` before any answer: its requester tries another host."""
        writer.write(pack_frame(Refused(reason=reason)))
        self._ended(writer, REFUSED)

    def _ended(self, writer: asyncio.StreamWriter, end: str) -> None:
        self._answering[writer].end = end

    async def serve(
        self,
        request: TunnelRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str | None = None,
        pumped: bool = False,
    ) -> bool:
        """Forward one tunnelled request to this node's llama-server for its model, if it is one the
        gateway would pass on; otherwise answer it with the error and forward nothing. True when a
        framed answer went out whole (the connection may carry another request). ``pumped``: the
        tunnel is a TCP connection (the fast path), and the body may be passed on by a relay thread
        or a :class:`~meshllm.net.body_pump.BodyPump`."""
        record = RequestRecord(path=request.path, started=time.monotonic(), model=request.model)
        self._answering[writer] = record
        try:
            if self.draining:
                self._sent_back(writer, "this node is leaving the mesh")
                return False
            with self.in_flight.track():
                return await self._serve(request, reader, writer, peer, pumped)
        finally:
            del self._answering[writer]
            self.log.info("tunnel.served", peer=peer, **record.fields())

    async def _serve(
        self,
        request: TunnelRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str | None,
        pumped: bool,
    ) -> bool:
        framed = request.headers.get(FRAMED_HEADER) == FRAMED
        headers = {k: v for k, v in request.headers.items() if k != FRAMED_HEADER}
        refusal = check_request(request.method, request.path, headers, request.body_bytes)
        if refusal is not None:
            self._refuse(writer, request, refusal, peer)
            return False
        body = await read_body(reader, request.body_bytes)
        if isinstance(body, Refusal):
            self._refuse(writer, request, body, peer)
            return False
        refusal = _content_length_agrees(headers, body)
        if refusal is not None:
            self._refuse(writer, request, refusal, peer)
            return False
        route = await local_route(self.directory, request.model, self.log, self.route_now)
        port = route.local_port if route is not None else 0
        if port:
            self.demand.hit(request.model)
        if not port:
            self._sent_back(writer, f"model {request.model!r} is not served on this node")
            return False
        if framed:
            return await self._serve_framed(request, headers, body, port, writer, peer, pumped)
        await self._serve_unframed(request, body, port, writer, peer)
        return False

    async def _serve_framed(
        self,
        request: TunnelRequest,
        headers: dict[str, str],
        body: bytes,
        port: int,
        writer: asyncio.StreamWriter,
        peer: str | None,
        pumped: bool,
    ) -> bool:
        """llama-server's answer with its body's bytes untouched; True when it went out whole. The
        TunnelResponse goes out with the body's first bytes, in one write: the requester sends its
        client nothing before them anyway, and one write is one TLS record and one wake-up less on
        each side. Until then nothing is sent, so a llama-server that breaks off before its first
        byte gets the request refused, and the requester tries another host."""
        try:
            upstream = await open_upstream(
                port, request.method, request.path, request_headers(headers), body, spares=self.spares
            )
        except UpstreamError as exc:
            self.log.warning("tunnel.upstream_unavailable", model=request.model, reason=str(exc))
            self._sent_back(writer, str(exc))
            return False
        try:
            framing = upstream.body
            read = upstream.reader.read
            try:
                first = await first_bytes(framing, upstream.first, lambda: read(CHUNK))
            except (ConnectionError, OSError, BadBody) as exc:
                reason = f"llama-server broke off before its first byte: {type(exc).__name__}: {exc}"
                self.log.warning("tunnel.upstream_unavailable", model=request.model, reason=reason)
                self._sent_back(writer, reason)
                return False
            head = pass_headers(upstream.headers)
            head[BODY_HEADER] = framing.framing
            writer.write(pack_frame(TunnelResponse(status=upstream.status, headers=head)) + first)
            self._answered(writer, upstream.status)
            if framing.done:
                self._ended(writer, WHOLE)
                return True
            if pumped:
                return await self._pump_answer(request, upstream, writer, peer)
            return await self._copy_answer(request, upstream, writer, peer)
        except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
            # The requester went away (a reset, or QUIC STOP_SENDING and a reset: aioquic raises
            # RuntimeError or ValueError on the next write); closing the llama-server connection stops
            # the generation.
            self.log.info("tunnel.requester_left", model=request.model, peer=peer, reason=str(exc))
            self._ended(writer, REQUESTER_LEFT)
            return False
        finally:
            upstream.close()

    async def _pump_answer(
        self, request: TunnelRequest, upstream: Upstream, writer: asyncio.StreamWriter, peer: str | None
    ) -> bool:
        """The rest of the body from llama-server's connection to the tunnel's, by a relay thread or
        the transport's read callback (:func:`~meshllm.net.body_pump.pump_body`); True when it went out
        whole."""
        result = await pump_body(
            upstream.body, upstream.reader, source_of(upstream.writer), writer.transport, writer.drain
        )
        if result.end is PumpEnd.WHOLE:
            self._ended(writer, WHOLE)
            return True
        if result.end is PumpEnd.SOURCE_BROKE:
            self._upstream_broke(request, writer, peer, result.reason)
        else:
            self.log.info("tunnel.requester_left", model=request.model, peer=peer, reason=result.reason)
            self._ended(writer, REQUESTER_LEFT)
        return False

    async def _copy_answer(
        self, request: TunnelRequest, upstream: Upstream, writer: asyncio.StreamWriter, peer: str | None
    ) -> bool:
        """The rest of the body read from llama-server and written to a QUIC stream, one read at a
        time."""
        framing = upstream.body
        read = upstream.reader.read
        while not framing.done:
            try:
                data = await read(CHUNK)
            except (ConnectionError, OSError) as exc:
                self._upstream_broke(request, writer, peer, f"{type(exc).__name__}: {exc}")
                return False
            if not data:
                self._upstream_broke(request, writer, peer, "llama-server closed the connection mid-answer")
                return False
            try:
                out = framing.feed(data)
            except BadBody as exc:
                self._upstream_broke(request, writer, peer, str(exc))
                return False
            if out:
                writer.write(out)
                await writer.drain()
        self._ended(writer, WHOLE)
        return True

    def _upstream_broke(
        self, request: TunnelRequest, writer: asyncio.StreamWriter, peer: str | None, reason: str
    ) -> None:
        """llama-server broke off mid-answer: reset the tunnel rather than end it, so the requester's
        gateway tells its client the answer is incomplete, not whole."""
        self.log.warning("tunnel.upstream_broke", model=request.model, peer=peer, reason=reason)
        self._ended(writer, LLAMA_BROKE)
        abort_tunnel(writer)

    async def _serve_unframed(
        self, request: TunnelRequest, body: bytes, port: int, writer: asyncio.StreamWriter, peer: str | None
    ) -> None:
        """An older requester's answer: the body's payload, until FIN (parsed by aiohttp)."""
        try:
            upstream = await open_local(
                self.session(), port, request.method, request.path, request_headers(request.headers), body
            )
        except UpstreamUnavailable as exc:
            self.log.warning("tunnel.upstream_unavailable", model=request.model, reason=str(exc))
            self._sent_back(writer, str(exc))
            return
        async with upstream:
            writer.write(
                pack_frame(TunnelResponse(status=upstream.status, headers=pass_headers(upstream.headers)))
            )
            self._answered(writer, upstream.status)
            try:
                async for chunk in upstream.content.iter_any():
                    writer.write(chunk)
                    await writer.drain()
                self._ended(writer, WHOLE)
            except aiohttp.ClientPayloadError as exc:
                # llama-server broke off mid-answer: reset the tunnel rather than end it, so the
                # requester's gateway tells its client the answer is incomplete, not whole.
                self._upstream_broke(request, writer, peer, str(exc))
            except (ConnectionError, RuntimeError) as exc:
                # The requester went away (a reset, or QUIC STOP_SENDING: aioquic raises RuntimeError
                # on the next write). Leaving this block closes the llama-server connection, and
                # llama-server stops generating.
                self.log.info("tunnel.requester_left", model=request.model, peer=peer, reason=str(exc))
                self._ended(writer, REQUESTER_LEFT)
