"""HTTP/1.1 to the local llama-server without a client library, and the body framings a relay tracks.

The gateway and the host side of a tunnel pass llama-server's answers on. Parsing each streamed
event with aiohttp and framing it again cost ~19 ms of CPU per 64-token answer per node, taken from
llama.cpp's own threads on a small machine. Here the request is written by hand on a fresh loopback
connection, the response head is parsed once, and the body's bytes go on untouched: a chunked body
stays chunked (the relay only finds where its chunks end), a body with a Content-Length stays that.

Knowing where the body ends lets a tunnel connection carry the next request (pooling), and tells a
body cut short (llama-server died) from a whole one. :class:`ChunkedBody` also gives out whole chunks
only, so a relay cut mid-answer can still append an error event as a chunk of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from meshllm.net.spare_connection import SpareConnections, connect

MAX_HEAD_BYTES = 65536
MAX_CHUNK_LINE = 1024
BODY_HEADER = "X-Meshllm-Body"
"""TunnelResponse header (never passed to a client): how the tunnel's body is framed, ``chunked`` or
a byte count. Without it (an older host) the body runs until the stream ends."""
FRAMED_HEADER = "X-Meshllm-Tunnel"
"""TunnelRequest header (never passed to llama-server): the requester takes a framed body
(:data:`BODY_HEADER`) and may send its next request on the same connection. An older host forwards
it to llama-server, which ignores it, and answers as before."""
FRAMED = "framed/1"


class BadBody(ValueError):
    """The upstream's body framing is not valid HTTP/1.1."""


class Body:
    """Where a body ends. :meth:`feed` takes the bytes read and returns the ones to pass on now."""

    done = False
    framing = ""
    """The :data:`BODY_HEADER` value that describes this body on a tunnel ("" for until-the-end)."""

    def feed(self, data: bytes) -> bytes:
        return data

    def close_is_end(self) -> bool:
        """Whether the stream ending now ends the body normally."""
        return True


class UntilEnd(Body):
    """A body that runs until its stream ends (an older host's tunnel)."""


class LengthBody(Body):
    """A body of a known number of bytes (a Content-Length)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.left = length
        self.done = length == 0
        self.framing = str(length)

    def feed(self, data: bytes) -> bytes:
        if len(data) >= self.left:
            data = data[: self.left]  # anything after the body is not ours to pass on
            self.done = True
        self.left -= len(data)
        return data

    def close_is_end(self) -> bool:
        return self.done


def _chunk_size(line: bytes) -> int:
    """A chunk's size from its size line (hex, maybe with ``;extensions``)."""
    try:
        size = int(line, 16)  # int() allows the spaces around it
    except ValueError:
        field = line.split(b";", 1)[0].strip()
        try:
            size = int(field, 16)
        except ValueError:
            raise BadBody(f"bad chunk size {field[:20]!r}") from None
    if size < 0:
        raise BadBody("negative chunk size")
    return size


class ChunkedBody(Body):
    """A chunked body passed through as it is: :meth:`feed` returns whole chunks only (the rest is held
    until it completes), and ``done`` once the last chunk and its empty trailer have gone by."""

    framing = "chunked"

    def __init__(self) -> None:
        self._held = b""
        self._pos = 0  # how far into _held has been read
        self._need = 0  # bytes of the current chunk (with its CRLF) still to come
        self._last = False  # the zero-size chunk has been seen

    def feed(self, data: bytes) -> bytes:
        # Once per token on every relaying node: kept to locals, one pass, no copy of a whole chunk.
        if self.done:
            return b""
        buf = self._held + data if self._held else data
        i = self._pos
        need = self._need
        boundary = 0
        end = len(buf)
        while i < end:
            if need:
                if end - i < need:
                    need -= end - i
                    i = end
                    break
                i += need
                need = 0
                boundary = i
                if self._last:
                    self.done = True
                    break
                continue
            j = buf.find(b"\r\n", i, i + MAX_CHUNK_LINE)
            if j < 0:
                if end - i >= MAX_CHUNK_LINE:
                    raise BadBody("chunk size line too long")
                break
            size = _chunk_size(buf[i:j])
            i = j + 2
            if size == 0:
                self._last = True  # no trailer fields from llama-server: the next line is empty
                need = 2
            else:
                need = size + 2
        self._need = need
        if boundary == end:
            self._held = b""
            self._pos = 0
            return buf
        self._held = b"" if self.done else buf[boundary:]
        self._pos = i - boundary
        return buf[:boundary]

    def close_is_end(self) -> bool:
        return self.done


def dechunk(whole_chunks: bytes) -> bytes:
    """The payload of whole chunks (what :meth:`ChunkedBody.feed` returns), for an HTTP/1.0 client."""
    out = []
    i = 0
    while i < len(whole_chunks):
        j = whole_chunks.index(b"\r\n", i)
        size = int(whole_chunks[i:j].split(b";", 1)[0], 16)
        out.append(whole_chunks[j + 2 : j + 2 + size])
        i = j + 4 + size
    return b"".join(out)


def body_from_tunnel(headers: Mapping[str, str]) -> Body:
    """The framing a host announced in its TunnelResponse (an older host's: until the end)."""
    value = headers.get(BODY_HEADER)
    if value is None:
        return UntilEnd()
    if value == "chunked":
        return ChunkedBody()
    try:
        length = int(value)
    except ValueError:
        raise BadBody(f"bad {BODY_HEADER} {value[:20]!r}") from None
    if length < 0:
        raise BadBody(f"bad {BODY_HEADER} {value[:20]!r}")
    return LengthBody(length)


async def first_bytes(body: Body, already: bytes, read: Callable[[], Awaitable[bytes]]) -> bytes:
    """Read until ``body`` has bytes to pass on (a whole chunk), or has ended; ``already``: bytes read
    with the head. A stream that ends before either raises ConnectionResetError."""
    if body.done:
        return b""
    data = already or await read()
    while True:
        if not data:
            if body.close_is_end():
                return b""
            raise ConnectionResetError("the answer's stream ended before its first byte")
        out = body.feed(data)
        if out or body.done:
            return out
        data = await read()


@dataclass
class Upstream:
    """A local llama-server's answer: its head parsed, its body still to read from ``reader``."""

    status: int
    headers: dict[str, str]
    body: Body
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    first: bytes = b""
    """Body bytes that came with the head (to pass through ``body.feed`` first)."""
    spares: SpareConnections | None = None
    port: int = 0

    def close(self) -> None:
        """Drop the connection: llama-server stops generating for it. The request has ended, so the
        next one to this llama-server gets a connection opened now (:mod:`~meshllm.net.spare_connection`)."""
        self.writer.transport.abort()
        if self.spares is not None:
            self.spares.replenish(self.port)


class UpstreamError(Exception):
    """The local llama-server could not be reached or sent no valid response head."""


def request_bytes(port: int, method: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """A whole HTTP/1.1 request that asks the server to close the connection after its answer."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise UpstreamError(f"bad header line {line[:80]!r}")
        key = name.strip()
        if key in headers:
            headers[key] += ", " + value.strip()
        else:
            headers[key] = value.strip()
    return int(parts[1]), headers


def _body_of(method: str, status: int, headers: Mapping[str, str]) -> Body | None:
    lower = {k.lower(): v for k, v in headers.items()}
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return LengthBody(0)
    if "chunked" in lower.get("transfer-encoding", "").lower():
        return ChunkedBody()
    if "content-length" in lower:
        try:
            return LengthBody(int(lower["content-length"]))
        except ValueError:
            raise UpstreamError(f"bad Content-Length {lower['content-length'][:20]!r}") from None
    return None  # until the connection closes


class _StaleSpare(Exception):
    """A spare connection closed before any byte of an answer: llama-server never took the request."""


async def open_upstream(
    port: int,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    timeout_s: float = 5.0,
    spares: SpareConnections | None = None,
) -> Upstream:
    """Send a request to the llama-server on loopback ``port`` and read its response head. A body that
    runs until the connection closes (not llama-server's way) is read whole and given a length.
    ``spares``: take a connection opened ahead of time when there is one (and open the next when
    the answer is closed)."""
    request = request_bytes(port, method, path, headers, body)
    spare = spares.take(port) if spares is not None else None
    if spare is not None:
        try:
            return await _exchange(port, method, request, *spare, spares, stale_is_error=False)
        except _StaleSpare:
            pass  # llama-server closed it just as the request went out: send it on a new one
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await connect(port, MAX_HEAD_BYTES)
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"llama-server on port {port}: {type(exc).__name__}: {exc}") from exc
    return await _exchange(port, method, request, reader, writer, spares, stale_is_error=True)


async def _exchange(
    port: int,
    method: str,
    request: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    spares: SpareConnections | None,
    stale_is_error: bool,
) -> Upstream:
    """Write ``request`` on the connection and read the answer's head; ``stale_is_error``: False for a
    spare, whose end before any byte raises _StaleSpare instead of UpstreamError."""
    try:
        writer.write(request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise UpstreamError("llama-server's response head is too large") from exc
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and not stale_is_error:
                raise _StaleSpare from exc
            raise UpstreamError("llama-server closed the connection before its response head") from exc
        except (ConnectionError, OSError) as exc:
            if not stale_is_error:
                raise _StaleSpare from exc
            raise UpstreamError(f"llama-server on port {port}: {type(exc).__name__}: {exc}") from exc
        status, response_headers = _parse_head(head[:-4])
        framing = _body_of(method, status, response_headers)
        if framing is None:
            try:
                whole = await reader.read()
            except (ConnectionError, OSError) as exc:
                raise UpstreamError(f"llama-server on port {port}: {type(exc).__name__}: {exc}") from exc
            sized = LengthBody(len(whole))
            return Upstream(status, response_headers, sized, reader, writer, whole, spares, port)
        return Upstream(status, response_headers, framing, reader, writer, spares=spares, port=port)
    except BaseException:
        writer.transport.abort()
        raise
