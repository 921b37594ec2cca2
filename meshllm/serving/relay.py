"""Passing a host's answer on to the client: after its first byte, and so that every end is honest.

The gateway sends the client nothing until the first byte of the body has come from the host: a host
that fails before that (killed between its headers and its first token) costs the client nothing, the
request goes to the next host. After the first byte the answer cannot move, so a host lost mid-way
must end it so that the client reports an error, never a normal end: for a stream, an SSE ``error``
event (the OpenAI clients raise it as an API error), then the connection dropped without the chunked
terminator (any HTTP client reports an incomplete body). A client that goes away mid-way is told to
whoever generates (``on_client_left``: the tunnel is reset, or the local connection closed), so the
generation stops instead of running to ``max_tokens`` for nobody.

The body's bytes go to the client as llama-server framed them (:mod:`meshllm.net.raw_http`): a
chunked body keeps its chunks, and only whole ones are passed on, so an error event can still follow
as a chunk of its own; a body with a length keeps it. An older host's tunnel body (payload until the
stream ends) is chunked by aiohttp as before. A body that comes over TCP (the local llama-server's
connection, a fast-path tunnel) is passed on after its first bytes by :func:`~meshllm.net.body_pump.pump_body`:
a relay thread that waits on the source alone (:mod:`meshllm.net.thread_relay`), or, when none can
take it, the source connection's read callback writing to the client's transport; no coroutine step
per token either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

from meshllm.logsetup import Logger
from meshllm.net.body_pump import pump_body
from meshllm.net.library_internals import send_chunks_as_they_are, send_head_with_first_write
from meshllm.net.pump_result import PumpEnd, PumpResult
from meshllm.net.raw_http import BadBody, Body, ChunkedBody, LengthBody, dechunk
from meshllm.serving.request_log import CLIENT_LEFT, HOST_LOST, RECORD, WHOLE


def _ended(request: web.Request, end: str) -> None:
    """Note in the request's access-log record (the gateway's proxy made it) how its answer ended."""
    request[RECORD].end = end


def _first_byte(request: web.Request) -> None:
    request[RECORD].first_byte()


def sse_error(reason: str) -> bytes:
    """An SSE event the OpenAI clients raise as an error (``{"error": {...}}``)."""
    body = {"error": {"message": f"the host serving this answer was lost: {reason}", "type": "server_error",
                      "code": HOST_LOST}}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def fail_mid_stream(
    request: web.Request, response: web.StreamResponse, reason: str, raw_chunks: bool = False
) -> None:
    """End an answer cut after its first byte so that no client takes it for a whole one
    (``raw_chunks``: the response's writes are chunk-framed by the caller, so the event is too)."""
    if "text/event-stream" in response.headers.get("Content-Type", ""):
        event = sse_error(reason)
        with contextlib.suppress(ConnectionError):
            await response.write(b"%x\r\n%s\r\n" % (len(event), event) if raw_chunks else event)
    transport = request.transport
    if transport is not None:
        transport.abort()  # no chunked terminator: the body is incomplete, and says so


PumpSource = tuple[asyncio.StreamReader, asyncio.Transport]
"""A TCP (or TLS over TCP) stream a body comes from, and its transport."""


async def _pump_rest(
    request: web.Request,
    response: web.StreamResponse,
    body: Body,
    first: bytes,
    pump_from: PumpSource,
    on_client_left: Callable[[], None],
    log: Logger,
    model: str,
    source: str,
) -> tuple[web.StreamResponse, bool]:
    """:func:`relay` for a body from a TCP stream: the first bytes through aiohttp (they carry the
    response head with them), the rest by a relay thread or body pump straight to the client's connection."""
    try:
        await response.write(first)
    except ConnectionError:
        log.info("gateway.client_left", model=model, source=source)
        _ended(request, CLIENT_LEFT)
        on_client_left()
        return response, False
    _first_byte(request)
    sink = request.transport
    if not body.done:
        if sink is None:
            result = PumpResult(PumpEnd.SINK_LEFT, "the client's connection closed")
        else:
            reader, transport = pump_from
            result = await pump_body(body, reader, transport, sink, request.writer.drain)
        if result.end is PumpEnd.SINK_LEFT:
            log.info("gateway.client_left", model=model, source=source)
            _ended(request, CLIENT_LEFT)
            on_client_left()
            return response, False
        if result.end is PumpEnd.SOURCE_BROKE:
            log.warning("gateway.host_lost_mid_response", model=model, source=source, reason=result.reason)
            _ended(request, HOST_LOST)
            await fail_mid_stream(request, response, result.reason, raw_chunks=isinstance(body, ChunkedBody))
            return response, False
    await _end(response, request)
    _ended(request, WHOLE)
    return response, body.done


async def _end(response: web.StreamResponse, request: web.Request) -> None:
    """End a body that came whole; a client that closed at its own end marker (the openai library
    does at ``data: [DONE]``) is not told, and did not leave mid-answer."""
    if request.transport is None or request.transport.is_closing():
        return
    with contextlib.suppress(ConnectionError):
        await response.write_eof()


async def relay(
    request: web.Request,
    status: int,
    headers: Mapping[str, str],
    body: Body,
    first: bytes,
    read_more: Callable[[], Awaitable[bytes]],
    on_client_left: Callable[[], None],
    log: Logger,
    model: str,
    source: str,
    pump_from: PumpSource | None = None,
) -> tuple[web.StreamResponse, bool]:
    """Send the client the answer whose head (``status``, ``headers``) and first body bytes (already
    through ``body.feed``) came from ``source``; ``read_more`` gives the raw bytes that follow (``b""``
    when its stream ends). ``pump_from``: the stream and TCP connection those bytes come from, for a
    relay thread or :class:`~meshllm.net.body_pump.BodyPump` to pass them on without a read per
    event. Returns the
    response and whether the body went out whole (it ended where its framing said: the source's
    connection may carry another request)."""
    response = web.StreamResponse(status=status, headers=headers)
    send_head_with_first_write(response)
    raw_chunks = isinstance(body, ChunkedBody) and request.version >= aiohttp.HttpVersion11
    if raw_chunks:
        response.enable_chunked_encoding()
    elif isinstance(body, LengthBody):
        response.content_length = body.length
    await response.prepare(request)
    if raw_chunks:
        send_chunks_as_they_are(request.writer)
    decode = isinstance(body, ChunkedBody) and not raw_chunks  # an HTTP/1.0 client: payload, then close
    if pump_from is not None and first and not decode:
        return await _pump_rest(request, response, body, first, pump_from, on_client_left, log, model, source)
    chunk = first
    while True:
        if chunk:
            try:
                await response.write(dechunk(chunk) if decode else chunk)
            except ConnectionError:
                if body.done:  # it missed only the body's last bytes (see _end)
                    _ended(request, WHOLE)
                    return response, True
                log.info("gateway.client_left", model=model, source=source)
                _ended(request, CLIENT_LEFT)
                on_client_left()
                return response, False
            _first_byte(request)
        if body.done:
            break
        try:
            data = await read_more()
            if not data and not body.close_is_end():
                raise ConnectionResetError("the answer's stream ended before its body did")
            chunk = body.feed(data) if data else b""
        except (ConnectionError, TimeoutError, aiohttp.ClientPayloadError, BadBody) as exc:
            log.warning("gateway.host_lost_mid_response", model=model, source=source, reason=str(exc))
            _ended(request, HOST_LOST)
            await fail_mid_stream(request, response, str(exc) or type(exc).__name__, raw_chunks)
            return response, False
        if not data:
            break  # an older host's body: its stream's end is the body's end
    await _end(response, request)
    _ended(request, WHOLE)
    return response, body.done
