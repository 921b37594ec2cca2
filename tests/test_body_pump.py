"""The body pump (meshllm/net/body_pump.py) and its relay threads (meshllm/net/thread_relay.py) on
real loopback TCP connections: a body passes from a stream's connection to another connection byte for
byte, the stream gets its connection back as it was, and each way a body can end (whole, source
broken, sink gone, bad framing, a slow sink, a cancel) is told apart, by both."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from meshllm.net import thread_relay
from meshllm.net.body_pump import pump_body, source_of
from meshllm.net.fast_path import tls_contexts
from meshllm.net.pump_result import CLOSED_AT_END, PumpEnd, PumpResult
from meshllm.net.raw_http import Body, ChunkedBody, LengthBody
from meshllm.net.thread_relay import Relay, take_over
from meshllm.wire.identity import NodeIdentity
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
async def connection(tls: bool = False) -> AsyncIterator[Pair]:
    """``tls``: TLS 1.3 over the connection, with the fast path's contexts."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put((r, w))

    server_tls, client_tls = tls_contexts(NodeIdentity.generate()) if tls else (None, None)
    server = await asyncio.start_server(on_accept, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    near_r, near_w = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
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


@pytest.fixture(params=[False, True], ids=["callback", "thread"])
def threads(request: pytest.FixtureRequest) -> bool:
    """Each test runs with the transport callback's pump and with a relay thread."""
    return bool(request.param)


def pump(body: Body, source: Pair, sink: Pair, threads: bool) -> asyncio.Future[PumpResult]:
    """The rest of ``body`` from ``source``'s stream to ``sink``'s connection, as a task."""
    return asyncio.ensure_future(
        pump_body(
            body, source.near_r, source_of(source.near_w), sink.near_w.transport, sink.near_w.drain, threads
        )
    )


def test_a_chunked_body_passes_whole_and_the_stream_gets_its_connection_back(threads: bool) -> None:
    chunks = [chunk(b"data: %d\n\n" % i) for i in range(20)]
    body_bytes = b"".join(chunks) + LAST

    async def main() -> None:
        async with connection() as source, connection() as sink:
            # A head line and the first chunk arrive together: the chunk waits in the stream's buffer.
            source.far_w.write(b"HEAD\n" + chunks[0])
            assert await source.near_r.readuntil(b"\n") == b"HEAD\n"
            task = pump(ChunkedBody(), source, sink, threads)
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


def test_a_source_that_closes_mid_body_is_reported_broken_after_the_whole_chunks(threads: bool) -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink, threads)
            source.far_w.write(chunk(b"whole") + b"10\r\nhalf")
            await source.far_w.drain()
            source.far_w.close()
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.SOURCE_BROKE
            assert await read_all(sink.far_r, len(chunk(b"whole"))) == chunk(b"whole")
            assert source.near_r.at_eof()  # the stream was told of the end too

    asyncio.run(main())


def test_bad_framing_from_the_source_is_reported_broken(threads: bool) -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink, threads)
            source.far_w.write(b"zz\r\nnot a chunk\r\n")
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.SOURCE_BROKE
            assert "chunk size" in result.reason

    asyncio.run(main())


def test_a_sink_that_went_away_ends_the_pump_at_the_next_event(threads: bool) -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(LengthBody(1000), source, sink, threads)
            source.far_w.write(b"x" * 10)
            assert await read_all(sink.far_r, 10) == b"x" * 10
            reset(sink.far_w)  # the client resets its connection
            await until(sink.near_w.transport.is_closing, timeout=10, what="the sink's connection to close")
            source.far_w.write(b"y" * 10)
            result = await asyncio.wait_for(task, 10)
            assert result.end is PumpEnd.SINK_LEFT

    asyncio.run(main())


def test_a_sink_gone_when_only_the_bodys_end_was_left_is_a_whole_body(threads: bool) -> None:
    """The openai library closes at ``data: [DONE]``; llama-server's terminating chunk comes after."""

    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink, threads)
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


def test_a_slow_sink_pauses_the_source_and_every_byte_arrives(threads: bool) -> None:
    payload = bytes(range(256)) * 256  # 64 KiB chunks
    count = 64  # 4 MiB: more than the sockets and the pump's high water hold
    body_bytes = chunk(payload) * count + LAST

    async def main() -> None:
        async with connection() as source, connection() as sink:
            small_buffers(sink)
            sink.far_w.transport.pause_reading()  # the client reads nothing for now
            source_transport = source_of(source.near_w)
            task = pump(ChunkedBody(), source, sink, threads)
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


def test_a_body_already_whole_in_the_streams_buffer_needs_no_pump(threads: bool) -> None:
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
                threads,
            )
            assert result.end is PumpEnd.WHOLE
            assert await read_all(sink.far_r, whole) == chunk(b"all") + LAST
            assert source_of(source.near_w).get_protocol() is protocol

    asyncio.run(main())


def count_thread_relays(monkeypatch: pytest.MonkeyPatch) -> list[Relay]:
    """The relays :func:`pump_body` hands to a thread, recorded as they start."""
    started: list[Relay] = []
    run = Relay.run

    async def recorded(self: Relay, body: Body) -> PumpResult:
        started.append(self)
        return await run(self, body)

    monkeypatch.setattr(Relay, "run", recorded)
    return started


def test_a_body_between_tcp_connections_is_relayed_by_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    started = count_thread_relays(monkeypatch)

    async def main() -> None:
        async with connection() as source, connection() as sink:
            # As the gateway and the tunnel server call it: threads by default
            sink_w = sink.near_w
            task = asyncio.ensure_future(
                pump_body(LengthBody(6), source.near_r, source_of(source.near_w), sink_w.transport, sink_w.drain)
            )
            source.far_w.write(b"abc")
            assert await read_all(sink.far_r, 3) == b"abc"
            assert len(started) == 1
            assert not source_of(source.near_w).is_reading()  # the loop reads nothing meanwhile
            source.far_w.write(b"def")
            assert (await asyncio.wait_for(task, 10)).end is PumpEnd.WHOLE
            assert await read_all(sink.far_r, 3) == b"def"
            await until(source_of(source.near_w).is_reading, timeout=5, what="the source to be given back")

    asyncio.run(main())


def test_with_every_relay_thread_busy_the_callback_pump_passes_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = count_thread_relays(monkeypatch)
    busy = threading.BoundedSemaphore(1)
    busy.acquire()
    monkeypatch.setattr(thread_relay, "_slots", busy)

    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(LengthBody(3), source, sink, threads=True)
            source.far_w.write(b"abc")
            assert (await asyncio.wait_for(task, 10)).end is PumpEnd.WHOLE
            assert await read_all(sink.far_r, 3) == b"abc"
            assert started == []

    asyncio.run(main())


def test_a_sink_still_sending_earlier_bytes_is_not_taken_by_a_thread() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            small_buffers(sink)
            sink.far_w.transport.pause_reading()
            sink.near_w.write(b"x" * (4 << 20))  # more than the sockets hold: the transport keeps the rest
            assert sink.near_w.transport.get_write_buffer_size() > 0
            assert take_over(source_of(source.near_w), sink.near_w.transport) is None

    asyncio.run(main())


async def relay_under_way(source: Pair, sink: Pair) -> asyncio.Future[PumpResult]:
    """A thread relaying a 1,000-byte body, its first bytes through."""
    task = pump(LengthBody(1000), source, sink, threads=True)
    source.far_w.write(b"abc")
    assert await read_all(sink.far_r, 3) == b"abc"
    return task


def test_a_cancelled_thread_relay_stops_at_once_and_gives_the_connection_back() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = await relay_under_way(source, sink)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            transport = source_of(source.near_w)
            await until(transport.is_reading, timeout=2, what="the relay to give the source back")
            source.far_w.write(b"NEXT")  # the stream reads what comes next, the relay took nothing more
            assert await read_all(source.near_r, 4) == b"NEXT"

    asyncio.run(main())


def test_a_source_the_loop_closes_mid_body_ends_the_thread_relay_as_broken() -> None:
    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = await relay_under_way(source, sink)
            source_of(source.near_w).abort()  # a tunnel reset by a drain that ran out of time
            result = await asyncio.wait_for(task, 5)
            assert result.end is PumpEnd.SOURCE_BROKE

    asyncio.run(main())


@pytest.mark.parametrize("then", ["end", "more"])
def test_a_thread_relay_that_saw_its_sink_close_decides_at_the_sources_next_bytes(
    monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The relay notices a closed sink while it waits (and lets the socket go), but a client that
    closed at ``data: [DONE]`` has not left mid-answer if what comes next ends the body."""
    started = count_thread_relays(monkeypatch)

    async def main() -> None:
        async with connection() as source, connection() as sink:
            task = pump(ChunkedBody(), source, sink, threads=True)
            done = chunk(b"data: [DONE]\n\n")
            source.far_w.write(done)
            assert await read_all(sink.far_r, len(done)) == done
            reset(sink.far_w)
            await until(lambda: started and started[0].sink_closed, timeout=5, what="the relay to see it")
            source.far_w.write(LAST if then == "end" else chunk(b"data: more\n\n"))
            result = await asyncio.wait_for(task, 10)
            if then == "end":
                assert result == PumpResult(PumpEnd.WHOLE, CLOSED_AT_END)
            else:
                assert result.end is PumpEnd.SINK_LEFT

    asyncio.run(main())


@pytest.mark.parametrize("tls", ["source", "sink", "both"])
def test_a_thread_relays_over_tls_and_both_connections_carry_on_after_it(
    monkeypatch: pytest.MonkeyPatch, tls: str
) -> None:
    """A tunnel's TLS connection is relayed with its own TLS state, and its transport reads and writes
    the next request's bytes after the relay as if it had relayed them itself."""
    started = count_thread_relays(monkeypatch)
    chunks = [chunk(b"data: %d\n\n" % i) for i in range(20)]

    async def main() -> None:
        async with connection(tls in ("source", "both")) as source, connection(tls in ("sink", "both")) as sink:
            task = pump(ChunkedBody(), source, sink, threads=True)
            for c in chunks:
                source.far_w.write(c)
                await source.far_w.drain()
            assert await read_all(sink.far_r, len(b"".join(chunks))) == b"".join(chunks)
            assert len(started) == 1
            source.far_w.write(LAST)
            assert (await asyncio.wait_for(task, 10)).end is PumpEnd.WHOLE
            assert await read_all(sink.far_r, len(LAST)) == LAST
            source.far_w.write(b"NEXT")  # the source's transport decrypts what follows
            assert await read_all(source.near_r, 4) == b"NEXT"
            sink.near_w.write(b"MORE")  # and the sink's encrypts it
            assert await read_all(sink.far_r, 4) == b"MORE"
            source.near_w.write(b"BACK")  # both ways
            assert await read_all(source.far_r, 4) == b"BACK"

    asyncio.run(main())


def test_a_drain_stops_a_thread_relaying_to_a_tls_tunnel_before_it_resets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = count_thread_relays(monkeypatch)

    async def main() -> None:
        async with connection() as source, connection(tls=True) as sink:
            task = await relay_under_way(source, sink)
            thread_relay.stop_relaying(sink.near_w.transport)
            assert started[0]._ended.is_set()
            result = await asyncio.wait_for(task, 5)
            assert result.end is PumpEnd.SINK_LEFT
            sink.near_w.transport.abort()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(sink.far_r.readexactly(1), 5)

    asyncio.run(main())
