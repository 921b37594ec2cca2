"""The surface of the OpenAI API as a node serves it: the routes, the body and header caps, and the
hop-by-hop header rules.

Two doors lead to a node's llama-server: the gateway (``[api] listen``, facing HTTP clients) and the
host side of the HTTP tunnel (facing mesh peers). Both must let through exactly the same requests, so
both take their routes and caps from here instead of each keeping its own copy that could drift; a
request the gateway would refuse must not reach llama-server by way of a tunnel (llama-server has other
endpoints, such as ``/slots`` and ``/props``, that are not the mesh's to offer).

:func:`check_request` is the tunnel's admission rule, a pure function over what a tunnel header frame
says; the gateway gets the same caps from aiohttp (:data:`SERVER_LIMITS`, ``client_max_size``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body either door accepts."""
MAX_HEADERS = 128
"""The most request headers either door accepts (aiohttp's own default for the gateway)."""
MAX_FIELD_BYTES = 8190
"""The longest header name or value either door accepts (aiohttp's ``max_field_size``)."""
SERVER_LIMITS: dict[str, int] = {
    "max_headers": MAX_HEADERS,
    "max_field_size": MAX_FIELD_BYTES,
    "max_line_size": MAX_FIELD_BYTES,
}
"""The header caps as aiohttp server keyword arguments, for the gateway."""

PROXIED: tuple[tuple[str, str], ...] = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
)
"""(method, path) of the requests the gateway passes on to a llama-server, here or on another node;
the only ones a tunnel carries: every OpenAI route llama-server serves (``/v1/embeddings`` answers
for models with ``embeddings = true`` in their ``[models.settings]``). ``GET /v1/models`` the gateway
answers itself, for the whole mesh (:func:`model_entry`)."""

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"}
)
"""Headers about one connection, never passed on by a proxy (RFC 9110 7.6.1), besides every
``Proxy-*`` header and each header the Connection header names."""
RECOMPUTED = frozenset({"host", "content-length", "expect"})
"""Request headers the proxy's own HTTP client sets for the request it makes."""
PASSED_RESPONSE_HEADERS = ("content-type", "cache-control")
"""The upstream response headers worth passing back (the rest are hop-by-hop or recomputed)."""

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's JSON error shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def is_hop_by_hop(name: str, named: frozenset[str] = frozenset()) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in named


def connection_named(headers: Mapping[str, str]) -> frozenset[str]:
    """The header names listed in the Connection header(s): hop-by-hop for this message."""
    named: set[str] = set()
    for name, value in headers.items():
        if name.lower() == "connection":
            named.update(part.strip().lower() for part in value.split(",") if part.strip())
    return frozenset(named)


def strip_hop_by_hop(headers: Mapping[str, str]) -> dict[str, str]:
    """The end-to-end headers of a message: without the hop-by-hop ones and those Connection names."""
    named = connection_named(headers)
    return {k: v for k, v in headers.items() if not is_hop_by_hop(k, named)}


def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What a proxy sends on of a request's headers: end-to-end ones, less those it sets itself."""
    return {k: v for k, v in strip_hop_by_hop(headers).items() if k.lower() not in RECOMPUTED}


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """What a proxy passes back of a response's headers (end-to-end, and only the ones worth it)."""
    return {k: v for k, v in strip_hop_by_hop(headers).items() if k.lower() in PASSED_RESPONSE_HEADERS}


def model_entry(name: str, created: int, size_bytes: int = 0, context_length: int = 0) -> dict[str, Any]:
    """One model of ``GET /v1/models``: OpenAI's fields, plus its context length (tokens) and the size
    of its weights (bytes) when known, both as fields of their own and in llama-server's ``meta``
    names (``n_ctx``, ``size``), so clients written for either find them."""
    entry: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "meshllm"}
    if context_length:
        entry["context_length"] = context_length
    if size_bytes:
        entry["size_bytes"] = size_bytes
    meta = {k: v for k, v in (("n_ctx", context_length), ("size", size_bytes)) if v}
    if meta:
        entry["meta"] = meta
    return entry


@dataclass(frozen=True)
class Refusal:
    """Why a request is not passed on: the HTTP status and OpenAI error it is answered with."""

    status: int
    message: str
    code: str

    def body(self) -> dict[str, Any]:
        return error_body(self.message, "invalid_request_error", self.code)


def _check_route(method: str, path: str) -> Refusal | None:
    methods = [m for m, p in PROXIED if p == path]
    if not methods:
        return Refusal(404, f"no route {path[:200]!r}", "unknown_route")
    if method not in methods:
        return Refusal(405, f"{method[:20]!r} is not allowed on {path}", "method_not_allowed")
    return None


def _check_headers(headers: Mapping[str, str]) -> Refusal | None:
    if len(headers) > MAX_HEADERS:
        return Refusal(431, f"{len(headers)} headers, over {MAX_HEADERS}", "headers_too_large")
    seen: set[str] = set()
    for name, value in headers.items():
        if len(name) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            return Refusal(
                431, f"header {name[:40]!r} over {MAX_FIELD_BYTES} bytes", "headers_too_large"
            )
        if not _TOKEN.fullmatch(name):
            return Refusal(400, f"header name {name[:40]!r} is not an HTTP token", "bad_header")
        if _BAD_VALUE.search(value):
            return Refusal(400, f"header {name[:40]!r} has control characters", "bad_header")
        if name.lower() in seen:
            return Refusal(400, f"header {name[:40]!r} given twice", "bad_header")
        seen.add(name.lower())
    return None


def _content_length(headers: Mapping[str, str], body_bytes: int) -> Refusal | None:
    """A Content-Length header, when there is one, must be a plain number that agrees with the frame."""
    for name, value in headers.items():
        if name.lower() != "content-length":
            continue
        if not value.isascii() or not value.isdigit():
            return Refusal(400, f"Content-Length {value[:40]!r} is not a number", "bad_content_length")
        if int(value) > MAX_BODY_BYTES:
            return Refusal(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large")
        if body_bytes >= 0 and int(value) != body_bytes:
            return Refusal(
                400, f"Content-Length {value} but {body_bytes} body bytes", "bad_content_length"
            )
    return None


def check_request(method: str, path: str, headers: Mapping[str, str], body_bytes: int) -> Refusal | None:
    """Whether a tunnelled request may go on to llama-server: ``None``, or why not.

    ``body_bytes`` is the size the peer announces, -1 for "until the stream ends" (its cap is then
    enforced while reading)."""
    if body_bytes < -1:
        return Refusal(400, f"body size {body_bytes} is negative", "bad_content_length")
    if body_bytes > MAX_BODY_BYTES:
        return Refusal(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large")
    return _check_route(method, path) or _check_headers(headers) or _content_length(headers, body_bytes)
