"""The raw HTTP/1.1 pieces the gateway and the tunnel host relay with (meshllm/net/raw_http.py): body
framings that find where a body ends without touching its bytes, and the hand-written request to
llama-server with its response head parsed once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.net.raw_http import (
    BadBody,
    ChunkedBody,
    LengthBody,
    UntilEnd,
    UpstreamError,
    body_from_tunnel,
    dechunk,
    open_upstream,
)

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def framed(payloads: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"


@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=20),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
)
def test_chunked_body_passes_whole_chunks_untouched(payloads: list[bytes], cuts: list[int]) -> None:
    raw = framed(payloads)
    body = ChunkedBody()
    out = b""
    i = 0
    k = 0
    while i < len(raw):
        n = cuts[k % len(cuts)]
        k += 1
        given_out = body.feed(raw[i : i + n])
        i += n
        out += given_out
        assert raw.startswith(out)
        # only whole chunks go out: what went out so far re-frames to itself
        whole = out.removesuffix(b"0\r\n\r\n") if body.done else out
        assert b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in _split(whole)) == whole
    assert body.done
    assert out == raw
    assert dechunk(out) == b"".join(payloads)


def _split(whole: bytes) -> list[bytes]:
    pieces = []
    i = 0
    while i < len(whole):
        j = whole.index(b"\r\n", i)
        size = int(whole[i:j], 16)
        pieces.append(whole[j + 2 : j + 2 + size])
        i = j + 4 + size
    return pieces


def test_a_partial_chunk_is_held_until_it_is_whole() -> None:
    body = ChunkedBody()
    assert body.feed(b"5\r\nhel") == b""
    assert body.feed(b"lo\r\n3") == b"5\r\nhello\r\n"
    assert body.feed(b"\r\nabc\r\n0\r\n") == b"3\r\nabc\r\n"
    assert not body.done and not body.close_is_end()
    assert body.feed(b"\r\n") == b"0\r\n\r\n"
    assert body.done and body.close_is_end()
    assert body.feed(b"more") == b""


def test_garbage_is_not_a_chunked_body() -> None:
    with pytest.raises(BadBody):
        ChunkedBody().feed(b"zz\r\n")
    with pytest.raises(BadBody):
        ChunkedBody().feed(b"1" * 2000)


def test_a_chunk_size_may_carry_extensions_and_is_never_negative() -> None:
    raw = b"5 ; name=value\r\nhello\r\n0;last\r\n\r\n"
    body = ChunkedBody()
    assert body.feed(raw) == raw and body.done
    for bad in (b"-5\r\nhello\r\n", b"5x;ext\r\nhello\r\n", b";ext\r\n"):
        with pytest.raises(BadBody):
            ChunkedBody().feed(bad)


def test_length_body_ends_at_its_length() -> None:
    body = LengthBody(5)
    assert body.feed(b"abc") == b"abc" and not body.done and not body.close_is_end()
    assert body.feed(b"defg") == b"de" and body.done
    assert LengthBody(0).done


def test_the_tunnel_header_names_the_framing() -> None:
    assert isinstance(body_from_tunnel({}), UntilEnd)
    assert isinstance(body_from_tunnel({"X-Meshllm-Body": "chunked"}), ChunkedBody)
    body = body_from_tunnel({"X-Meshllm-Body": "12"})
    assert isinstance(body, LengthBody) and body.length == 12
    for bad in ("-1", "x"):
        with pytest.raises(BadBody):
            body_from_tunnel({"X-Meshllm-Body": bad})


def upstream_of(serve: Serve) -> tuple[int, bytes, dict[str, str], bytes]:
    """Run ``serve`` as a loopback server, send it one request: (status, framing, headers, body)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        seen.append(await reader.readexactly(4))
        await serve(reader, writer)
        writer.close()

    async def main() -> tuple[int, bytes, dict[str, str], bytes]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            up = await open_upstream(port, "POST", "/v1/x", {"Content-Type": "application/json"}, b"{}{}")
            out = up.body.feed(up.first) if up.first else b""
            while not up.body.done and (data := await up.reader.read(100)):
                out += up.body.feed(data)
            up.close()
            return up.status, up.body.framing.encode(), up.headers, out
        finally:
            server.close()

    result = asyncio.run(main())
    head = seen[0].decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\n") and "Content-Length: 4\r\n" in head
    assert "Connection: close\r\n" in head and seen[1] == b"{}{}"
    return result


def test_open_upstream_reads_a_chunked_answer() -> None:
    raw = framed([b"data: 1\n\n", b"data: 2\n\n"])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(0, len(raw), 7):
            writer.write(raw[i : i + 7])
            await writer.drain()

    status, framing, headers, out = upstream_of(serve)
    assert (status, framing, out) == (200, b"chunked", raw)
    assert headers["Content-Type"] == "text/event-stream"


def test_open_upstream_reads_a_sized_and_an_unsized_answer() -> None:
    async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabc")

    async def unsized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")

    assert upstream_of(sized)[:2] + upstream_of(sized)[3:] == (404, b"3", b"abc")
    status, framing, _, out = upstream_of(unsized)
    assert (status, framing, out) == (200, b"13", b"until the end")


def test_an_upstream_that_closes_before_its_head_is_an_error() -> None:
    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200")

    with pytest.raises(UpstreamError):
        upstream_of(closes)
    with pytest.raises(UpstreamError):
        asyncio.run(open_upstream(1, "GET", "/", {}, b""))
