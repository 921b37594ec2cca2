"""Passing the rest of a streamed body from one connection to the next inside the transport's callback.

A streamed answer is one small write per generated token, and a relay that reads it with an asyncio
stream pays, per token, for a future, a task step and the coroutines above the read, on every node it
crosses. On a small machine that CPU is taken from llama.cpp's own threads (tests/bench/bench_gateway:
the remote path spent ~25 ms of CPU per 64-token answer on each of the two nodes). Once the head and
the first byte have gone on, nothing about the body needs a coroutine: :class:`BodyPump` stands in for
the source connection's protocol, and each read goes from the transport's callback through
:meth:`~meshllm.net.raw_http.Body.feed` straight to the sink transport's ``write``.

The source's own stream protocol is put back as soon as the body is over (or the source ends), with
whatever came after the body and the end of the connection passed on to it, so a pooled tunnel
connection is left exactly as a stream read would have left it. Flow control: when the sink's buffer
grows past :data:`HIGH_WATER` the source is paused until the sink drains.

:func:`pump_body` first offers the body to a relay thread (:mod:`meshllm.net.thread_relay`), which
costs less per token still; this pump passes it when every relay thread is busy, relay threads are
off, or a transport is not one a thread can take.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

from meshllm.net.library_internals import take_buffered
from meshllm.net.pump_result import PumpEnd, PumpResult, sink_gone, stream_ended
from meshllm.net.raw_http import BadBody, Body
from meshllm.net.thread_relay import take_over

HIGH_WATER = 256 * 1024
"""Sink bytes not yet sent at which the source is paused (a client that reads slowly)."""


_PAUSED = PumpResult(PumpEnd.WHOLE, "paused")  # a signal to the waiting coroutine, never returned


class BodyPump(asyncio.Protocol):
    """The source connection's protocol while the rest of one body passes through (see the module)."""

    def __init__(
        self,
        body: Body,
        source: asyncio.Transport,
        sink: asyncio.WriteTransport,
        sink_drain: Callable[[], Awaitable[None]],
    ) -> None:
        self.body = body
        self.source = source
        self.sink = sink
        self.sink_drain = sink_drain
        self.previous = source.get_protocol()
        self.result: PumpResult | None = None
        self.paused = False
        self._signal: asyncio.Future[PumpResult] = asyncio.get_running_loop().create_future()

    def _finish(self, result: PumpResult) -> None:
        if self.result is None:
            self.result = result
            self.source.set_protocol(self.previous)
        if not self._signal.done():
            self._signal.set_result(result)

    def _pass_on(self, data: bytes) -> None:
        """Feed the body's bytes through its framing and write what it gives out to the sink."""
        try:
            out = self.body.feed(data)
        except BadBody as exc:
            self._finish(PumpResult(PumpEnd.SOURCE_BROKE, str(exc)))
            return
        if out:
            if self.sink.is_closing():
                self._finish(sink_gone(self.body, "the connection to pass the answer on to closed"))
                return
            self.sink.write(out)
        if self.body.done:
            self._finish(PumpResult(PumpEnd.WHOLE))
        elif self.sink.get_write_buffer_size() > HIGH_WATER:
            self.source.pause_reading()
            self.paused = True
            if not self._signal.done():
                self._signal.set_result(_PAUSED)

    def data_received(self, data: bytes) -> None:
        if self.result is not None:  # bytes after the body: the stream's business, not the pump's
            self.previous.data_received(data)  # type: ignore[attr-defined]
            return
        self._pass_on(data)  # what follows the body in the same read is dropped, as a stream read would

    def eof_received(self) -> bool | None:
        self._finish(stream_ended(self.body))
        return self.previous.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        ended = exc is None and self.body.close_is_end()
        reason = f"{type(exc).__name__}: {exc}" if exc else "the connection closed mid-body"
        self._finish(PumpResult(PumpEnd.WHOLE) if ended else PumpResult(PumpEnd.SOURCE_BROKE, reason))
        self.previous.connection_lost(exc)

    async def run(self) -> PumpResult:
        """Wait for the body's end, draining the sink whenever it filled up."""
        while True:
            signal = await self._signal
            if signal is not _PAUSED:
                return signal
            self._signal = asyncio.get_running_loop().create_future()
            try:
                await self.sink_drain()
            except (ConnectionError, OSError) as exc:
                self._finish(PumpResult(PumpEnd.SINK_LEFT, str(exc)))
            if self.result is not None:
                return self.result
            self.paused = False
            self.source.resume_reading()


def source_of(writer: asyncio.StreamWriter) -> asyncio.Transport:
    """The whole transport under a stream (asyncio types a stream writer's as write-only)."""
    return cast(asyncio.Transport, writer.transport)


async def pump_body(
    body: Body,
    reader: asyncio.StreamReader,
    source: asyncio.Transport,
    sink: asyncio.WriteTransport,
    sink_drain: Callable[[], Awaitable[None]],
    threads: bool = True,
) -> PumpResult:
    """Pass the rest of ``body`` from the stream (``reader`` over ``source``) to ``sink``: first what
    the stream already holds, then each read as it comes, by a relay thread when one can take both
    connections (:mod:`meshllm.net.thread_relay`; ``threads`` False: never), else written by the
    transport's callback."""
    pump = BodyPump(body, source, sink, sink_drain)
    held, ended, failed = take_buffered(reader)
    if held:
        pump._pass_on(held)
    if pump.result is not None:
        return pump.result
    if failed is not None:
        return PumpResult(PumpEnd.SOURCE_BROKE, f"{type(failed).__name__}: {failed}")
    if ended:
        return stream_ended(body)
    if source.is_closing():
        return PumpResult(PumpEnd.SOURCE_BROKE, "the connection closed mid-body")
    relay = take_over(source, sink, threads)
    if relay is not None:
        return await relay.run(body)
    source.set_protocol(pump)
    if not pump.paused and not source.is_reading():
        source.resume_reading()  # the stream had paused it for a full buffer, now empty
    try:
        return await pump.run()
    finally:
        if pump.result is None:  # cancelled: the stream takes its connection back
            pump.result = PumpResult(PumpEnd.SINK_LEFT, "cancelled")
            source.set_protocol(pump.previous)
