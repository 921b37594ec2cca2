"""Passing a host's answer on to the client: after its first byte, and so that every end is honest.

The gateway sends the client nothing until the first byte of the body has come from the host: a host
that fails before that (killed between its headers and its first token) costs the client nothing, the
request goes to the next host. After the first byte the answer cannot move, so a host lost mid-way
must end it so that the client reports an error, never a normal end: for a stream, an SSE ``error``
event (the OpenAI clients raise it as an API error), then the connection dropped without the chunked
terminator (any HTTP client reports an incomplete body). A client that goes away mid-way is told to
whoever generates (``on_client_left``: the tunnel is reset, or the local connection closed), so the
generation stops instead of running to ``max_tokens`` for nobody.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

from meshllm.logsetup import Logger

HOST_LOST = "host_lost"


def sse_error(reason: str) -> bytes:
    """An SSE event the OpenAI clients raise as an error (``{"error": {...}}``)."""
    body = {"error": {"message": f"the host serving this answer was lost: {reason}", "type": "server_error",
                      "code": HOST_LOST}}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def fail_mid_stream(request: web.Request, response: web.StreamResponse, reason: str) -> None:
    """End an answer cut after its first byte so that no client takes it for a whole one."""
    if "text/event-stream" in response.headers.get("Content-Type", ""):
        with contextlib.suppress(ConnectionError):
            await response.write(sse_error(reason))
    transport = request.transport
    if transport is not None:
        transport.abort()  # no chunked terminator: the body is incomplete, and says so


async def relay(
    request: web.Request,
    status: int,
    headers: Mapping[str, str],
    first: bytes,
    read_more: Callable[[], Awaitable[bytes]],
    on_client_left: Callable[[], None],
    log: Logger,
    model: str,
    source: str,
) -> web.StreamResponse:
    """Send the client the answer whose head (``status``, ``headers``) and first body bytes came from
    ``source``; ``read_more`` gives the rest (``b""`` at its end)."""
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    chunk = first
    while chunk:
        try:
            await response.write(chunk)
        except ConnectionError:
            log.info("gateway.client_left", model=model, source=source)
            on_client_left()
            return response
        try:
            chunk = await read_more()
        except (ConnectionError, TimeoutError, aiohttp.ClientPayloadError) as exc:
            log.warning("gateway.host_lost_mid_response", model=model, source=source, reason=str(exc))
            await fail_mid_stream(request, response, str(exc) or type(exc).__name__)
            return response
    try:
        await response.write_eof()
    except ConnectionError:
        log.info("gateway.client_left", model=model, source=source)
    return response
