"""The host side of a framed HTTP tunnel sends nothing before llama-server's first body byte: then
the TunnelResponse and those bytes go out in one write (one TLS record, one wake-up for the
requester), and a llama-server that breaks off before its first byte gets the request refused, so
the requester can try another host, rather than a head followed by a reset."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import pytest

from actors.base import Directory
from meshllm.logsetup import make_logger
from meshllm.net import http_tunnel
from meshllm.net.http_tunnel import HttpTunnelServer
from meshllm.net.raw_http import BODY_HEADER, FRAMED, FRAMED_HEADER
from meshllm.wire.framing import read_frame
from meshllm.wire.messages import Refused, TunnelResponse
from tests.support import LogCapture
from tests.tunnel_support import route_to, tunnel_request

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
FIRST_CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
LAST_CHUNK = b"0\r\n\r\n"

Answerer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "WriteLog"], Awaitable[None]]


class WriteLog:
    """A tunnel writer that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.written = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.written.set()

    async def drain(self) -> None:
        return None


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        0,
    )
    await reader.readexactly(length)


async def serve_one(answer: Answerer, monkeypatch: pytest.MonkeyPatch) -> tuple[WriteLog, LogCapture, bool]:
    """One framed tunnel request (QUIC-style, no pump) to a fresh HttpTunnelServer whose model is
    served by a fake llama-server that answers with ``answer``."""

    log = WriteLog()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            await answer(reader, writer, log)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(http_tunnel, "local_route", route_to(port))
    capture = LogCapture()
    tunnel = HttpTunnelServer(Directory(), make_logger("host", stream=capture))
    request = tunnel_request(
        headers={"Content-Type": "application/json", FRAMED_HEADER: FRAMED}, body_bytes=2
    )
    reader = asyncio.StreamReader()
    reader.feed_data(b"{}")
    reader.feed_eof()
    try:
        whole = await asyncio.wait_for(tunnel.serve(request, reader, cast(asyncio.StreamWriter, log)), 20)
    finally:
        await tunnel.close()
        server.close()
        await server.wait_closed()
    return log, capture, whole


async def _frame_of(data: bytes) -> tuple[object, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frame = await read_frame(reader)
    return frame, await reader.read()


def test_the_head_goes_out_with_the_first_body_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-server sends its head at once and its first chunk later (as it does while it reads the
    prompt); the tunnel's first write holds both."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: WriteLog) -> None:
        writer.write(HEAD)
        await writer.drain()
        writer.write(FIRST_CHUNK)
        await writer.drain()
        await log.written.wait()  # the last chunk comes after the tunnel's first write
        writer.write(LAST_CHUNK)
        await writer.drain()

    async def run() -> None:
        log, _, whole = await serve_one(answer, monkeypatch)
        assert whole
        frame, rest = await _frame_of(log.writes[0])
        assert isinstance(frame, TunnelResponse) and frame.status == 200
        assert frame.headers[BODY_HEADER] == "chunked"
        assert rest == FIRST_CHUNK, log.writes
        assert b"".join(log.writes[1:]) == LAST_CHUNK

    asyncio.run(run())


def test_llama_server_breaking_off_before_its_first_byte_gets_the_request_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Head, then the connection closes: nothing of an answer went out, so the requester is told to go
    elsewhere (Refused), and the log says why."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: WriteLog) -> None:
        writer.write(HEAD + b"1")  # the start of a chunk size line, then nothing
        await writer.drain()

    async def run() -> None:
        log, capture, whole = await serve_one(answer, monkeypatch)
        (write,) = log.writes
        frame, rest = await _frame_of(write)
        assert not whole
        assert isinstance(frame, Refused) and "before its first byte" in frame.reason
        assert rest == b""
        (record,) = capture.find("tunnel.upstream_unavailable")
        assert "before its first byte" in record["reason"]

    asyncio.run(run())


def test_bad_framing_before_the_first_byte_gets_the_request_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: WriteLog) -> None:
        writer.write(HEAD + b"zz\r\nnot a chunk\r\n")
        await writer.drain()

    async def run() -> None:
        log, capture, _ = await serve_one(answer, monkeypatch)
        (write,) = log.writes
        frame, _ = await _frame_of(write)
        assert isinstance(frame, Refused) and "bad chunk size" in frame.reason
        assert capture.find("tunnel.upstream_unavailable")

    asyncio.run(run())


def test_an_empty_body_answer_is_sent_whole_without_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body of length 0 is over with its head: nothing is read after it (the connection may stay
    open), and the tunnel counts the answer as whole."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: WriteLog) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await reader.read()  # stays open until the tunnel closes its side

    async def run() -> None:
        log, _, whole = await serve_one(answer, monkeypatch)
        (write,) = log.writes
        frame, rest = await _frame_of(write)
        assert isinstance(frame, TunnelResponse) and frame.status == 204 and rest == b""
        assert whole

    asyncio.run(run())
