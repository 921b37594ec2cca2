"""The body pump (meshllm/net/body_pump.py) on real loopback TCP connections: a body passes from a
stream's connection to another connection byte for byte, the stream gets its connection back as it
was, and each way a body can end (whole, source broken, sink gone, bad framing, a slow sink) is told
apart."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

from meshllm.net.body_pump import CLOSED_AT_END, PumpEnd, PumpResult, pump_body, source_of
from meshllm.net.raw_http import Body, ChunkedBody, LengthBody
from tests.support import until


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


LAST = b"0\r\n\r\n"


@dataclass
class Pair:
    """Two ends of a loopback TCP connection: ``near`` is ours (streams), ``far`` the other side."""

    near_r: asyncio.StreamReader
    near_w: asyncio.StreamWriter
    far_r: asyncio.StreamReader
    far_w: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def connection() -> AsyncIterator[Pair]:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    near_r, near_w = await asyncio.open_connection("127.0.0.1", port)
    far_r, far_w = await asyncio.wait_for(accepted.get(), 5)
    try:
        yield Pair(near_r, near_w, far_r, far_w)
    finally:
        for w in (near_w, far_w):
            w.transport.abort()
        server.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a client that is killed or gives up does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def small_buffers(pair: Pair) -> None:
    """Socket buffers of 64 KiB, so a sink that does not read fills up within a few MiB."""
    pair.near_w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    pair.far_w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)


async def read_all(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


def pump(body: Body, source: Pair, sink: Pair) -> asyncio.Future[PumpResult]:
    """The rest of ``body`` from ``source``'s stream to ``sink``'s connection, as a task."""
    return asyncio.ensure_future(
        pump_body(body, source.near_r, source_of(source.near_w), sink.near_w.transport, sink.near_w.drain)
    )


def test_a_chunked_body_passes_whole_and_the_stream_gets_its_connection_back() -> None:
    chunks = [chunk(b"data: %d\n\n" % i) for i in range(20)]
    body_bytes = b"".join(chunks) + LAST

    async def main() -> None:
        async with connection() as source, connection() as sink:
            # A head line and the first chunk arrive together: the chunk waits in the stream's buffer.
            source.far_w.write(b"HEAD\n" + chunks[0])
            assert await source.near_r.readuntil(b"\n") == b"HEAD\n"
            task = pump(ChunkedBody(), source, sink)
            for c in chunks[1:]:
                source.far_w.write(c[:3])  # split chunks: only whole ones go on
                await source.far_w.drain()
                source.far_w.write(c[3:])
                await source.far_w.drain()
            source.far_w.write(LAST)
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.WHOLE
            assert await read_all(sink.far_r, len(body_bytes)) == body_bytes
            source.far_w.write(b"NEXT")  # the connection carries its next answer: the stream reads it
            assert await read_all(source.near_r, 4) == b"NEXT"

    asyncio.run(main())


def test_a_source_that_closes_mid_body_is_reported_broken_after_the_whole_chunks() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink)
            source.far_w.write(chunk(b"whole") + b"10\r\nhalf")
            await source.far_w.drain()
            source.far_w.close()
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.SOURCE_BROKE
            assert await read_all(sink.far_r, len(chunk(b"whole"))) == chunk(b"whole")
            assert source.near_r.at_eof()  # the stream was told of the end too

    asyncio.run(main())


def test_bad_framing_from_the_source_is_reported_broken() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink)
            source.far_w.write(b"zz\r\nnot a chunk\r\n")
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.SOURCE_BROKE
            assert "chunk size" in result.reason

    asyncio.run(main())


def test_a_sink_that_went_away_ends_the_pump_at_the_next_event() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(LengthBody(1000), source, sink)
            source.far_w.write(b"x" * 10)
            assert await read_all(sink.far_r, 10) == b"x" * 10
            reset(sink.far_w)  # the client resets its connection
            await until(sink.near_w.transport.is_closing, timeout=10, what="the sink's connection to close")
            source.far_w.write(b"y" * 10)
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.SINK_LEFT

    asyncio.run(main())


def test_a_sink_gone_when_only_the_bodys_end_was_left_is_a_whole_body() -> None:
    """The openai library closes at ``data: [DONE]``; llama-server's terminating chunk comes after."""

    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink)
            done = chunk(b"data: [DONE]\n\n")
            source.far_w.write(done)
            assert await read_all(sink.far_r, len(done)) == done
            reset(sink.far_w)  # it has what it waited for: it closes, unread bytes and all (a reset)
            await until(sink.near_w.transport.is_closing, timeout=10, what="the sink's connection to close")
            source.far_w.write(LAST)
            result = await asyncio.wait_for(task, 10)
            assert result == PumpResult(PumpEnd.WHOLE, CLOSED_AT_END)
            source.far_w.write(b"NEXT")  # the connection is whole: the stream reads its next answer
            assert await read_all(source.near_r, 4) == b"NEXT"

    asyncio.run(main())


def test_a_slow_sink_pauses_the_source_and_every_byte_arrives() -> None:
    payload = bytes(range(256)) * 256  # 64 KiB chunks
    count = 64  # 4 MiB: more than the sockets and the pump's high water hold
    body_bytes = chunk(payload) * count + LAST

    async def main() -> None:
        async with connection() as source, connection() as sink:
            small_buffers(sink)
            sink.far_w.transport.pause_reading()  # the client reads nothing for now
            source_transport = source_of(source.near_w)
            task = pump(ChunkedBody(), source, sink)
            sending = asyncio.ensure_future(_send(source.far_w, body_bytes))
            await until(
                lambda: not source_transport.is_reading(), timeout=10, what="the pump to pause the source"
            )
            assert not task.done()
            sink.far_w.transport.resume_reading()
            assert await read_all(sink.far_r, len(body_bytes)) == body_bytes
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.WHOLE
            await sending

    asyncio.run(main())


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def test_a_body_already_whole_in_the_streams_buffer_needs_no_pump() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            source.far_w.write(b"HEAD\n" + chunk(b"all") + LAST)
            assert await source.near_r.readuntil(b"\n") == b"HEAD\n"
            whole = len(chunk(b"all") + LAST)
            buffered = lambda: len(source.near_r._buffer) >= whole  # type: ignore[attr-defined]  # noqa: E731
            await until(buffered, timeout=10, what="the body to wait in the stream's buffer")
            protocol = source_of(source.near_w).get_protocol()
            result = await pump_body(
                ChunkedBody(),
                source.near_r,
                source_of(source.near_w),
                sink.near_w.transport,
                sink.near_w.drain,
            )
            assert result.end is PumpEnd.WHOLE
            assert await read_all(sink.far_r, whole) == chunk(b"all") + LAST
            assert source_of(source.near_w).get_protocol() is protocol

    asyncio.run(main())
