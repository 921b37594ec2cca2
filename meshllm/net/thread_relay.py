"""Passing the rest of a streamed body on from a thread that waits on its connection alone.

A streamed answer is one small write per generated token, and every node it crosses wakes once per
token to pass it on. In the event loop each wake-up costs an ``epoll_wait``, the loop's bookkeeping
and the transports' Python around each ``recv`` and ``send`` (asyncio's TLS protocol most of all); on
a host that CPU is taken from llama.cpp's threads. A thread that waits in ``poll`` on the one
connection it relays, then reads, finds the chunk boundaries and writes, does less per token. On this
project's 2-core VM (tests/bench/bench_gateway, SmolLM2 streaming 64 tokens, runs with
``--relay-threads 0`` interleaved, 3 runs each): CPU per response on the remote path, node A
29.8-36.2 ms against 35.6-42.5, node B 23.7-28.2 against 33.0-37.8 (~8 ms of each is the node's idle
work); on the local path node A 25.8-31.2 against 30.2-33.3. Per leg (tests/bench/bench_relay.py), a relay
thread takes 0.66-0.78 of the callback pump's CPU per token, and 1.07-1.15 of a bare blocking Python
relay's: most of what remains is the wake-up, the system calls and TLS, not this module's Python.

A relay holds a connection only while one body passes: the loop's transport reads nothing meanwhile
(a source's, and a TLS connection's TCP transport, are paused; nothing else writes to either), the
thread works on a duplicate of the socket's descriptor (so a transport closed meanwhile never leaves it
writing to a reused descriptor), and the transport gets its connection back when the body has ended,
as the callback pump (:mod:`meshllm.net.body_pump`) leaves it. A TLS connection (the fast path) is
relayed with its own TLS state, taken from asyncio's TLS transport
(:func:`~meshllm.net.library_internals.tls_state`), so the transport carries on after it where the
relay stopped. The loop may close a connection a relay holds only after :func:`stop_relaying`.

At most ``MESHLLM_RELAY_THREADS`` bodies (default 32, 0 for none) are relayed by threads at once per
process; more at the same time use the callback pump, so a burst never waits for a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from meshllm.net.library_internals import TlsState, tls_state
from meshllm.net.pump_result import PumpEnd, PumpResult, sink_gone, stream_ended
from meshllm.net.raw_http import BadBody, Body

RELAY_THREADS = int(os.environ.get("MESHLLM_RELAY_THREADS", "32"))
"""Bodies relayed by threads at once, per process."""
READ_BYTES = 64 * 1024
"""Per read: a TLS record is at most 16 KiB, and an allocation this size stays off mmap."""
STOP_WAIT_S = 2.0
"""A stopped relay's thread is out of its wait at once; this only bounds a wait that should not be."""
TICK_MS = 250
"""How often a relay waiting on a quiet connection looks whether either transport was closed meanwhile
(a client gone, a tunnel reset by a drain); a cancelled relay is woken at once."""


class Stopped(Exception):
    """The relay was cancelled, or the loop closed the sink's transport (a client gone)."""


class SourceClosed(Exception):
    """The loop closed the source's transport (a tunnel reset) while the relay waited on it."""


class End(Protocol):
    """One side of a relay, on a duplicated descriptor: ``read`` gives plain bytes (``b""``: nothing
    complete yet; None: the stream ended), ``write`` sends all of ``data``, waiting with ``wait``
    whenever the socket is full. ``paused``: the loop's transport that must read nothing meanwhile
    (None: the loop may go on reading, as it does a client's connection to see it leave)."""

    fd: int
    paused: asyncio.Transport | None
    more: bool
    """The last read may have left bytes ready to read (it filled its buffer)."""

    def read(self, wait: Callable[[int, int], None]) -> bytes | None: ...

    def write(self, data: bytes, wait: Callable[[int, int], None]) -> None: ...

    def close(self) -> None: ...


def _send_all(sock: socket.socket, data: bytes, wait: Callable[[int, int], None]) -> None:
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return  # nearly always: a token is far smaller than the socket's buffer
    view = memoryview(data)[sent:]
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            wait(sock.fileno(), select.POLLOUT)
            continue
        view = view[sent:]


def _dup(sock: socket.socket) -> socket.socket:
    copy = socket.socket(fileno=os.dup(sock.fileno()))
    copy.setblocking(False)  # the descriptor is the loop's too: it stays non-blocking
    return copy


class SocketEnd:
    """A plain TCP connection."""

    def __init__(self, sock: socket.socket, paused: asyncio.Transport | None) -> None:
        self.sock = _dup(sock)
        self.fd = self.sock.fileno()
        self.paused = paused
        self.more = False
        self._recv = self.sock.recv

    def read(self, wait: Callable[[int, int], None]) -> bytes | None:
        try:
            data = self._recv(READ_BYTES)
        except BlockingIOError:
            self.more = False
            return b""
        self.more = len(data) == READ_BYTES
        return data or None

    def write(self, data: bytes, wait: Callable[[int, int], None]) -> None:
        _send_all(self.sock, data, wait)

    def close(self) -> None:
        self.sock.close()


class TlsEnd:
    """A TLS connection of asyncio's, relayed with its own TLS state (:func:`tls_state`): records are
    read from the socket into its incoming buffer and decrypted, or encrypted into its outgoing buffer
    and sent, as its transport would, so the transport carries on where the relay stopped."""

    def __init__(self, sock: socket.socket, state: TlsState) -> None:
        self.sock = _dup(sock)
        self.fd = self.sock.fileno()
        self.state = state
        self.paused: asyncio.Transport | None = state.tcp
        self.more = False
        # Bound once: these run once per token.
        self._recv = self.sock.recv
        self._incoming = state.incoming
        self._outgoing = state.outgoing
        self._decrypt = state.sslobj.read
        self._encrypt = state.sslobj.write
        self._plain_waiting = state.sslobj.pending

    def read(self, wait: Callable[[int, int], None]) -> bytes | None:
        incoming = self._incoming
        try:
            raw: bytes | None = self._recv(READ_BYTES)
        except BlockingIOError:
            raw = None
        self.more = raw is not None and len(raw) == READ_BYTES
        if raw:
            incoming.write(raw)
        elif raw == b"":
            incoming.write_eof()
        plain = []
        ended = False
        # Decrypt again only while bytes wait: an SSLWantReadError costs more than a token.
        while raw is not None or incoming.pending or self._plain_waiting():
            raw = None
            try:
                data = self._decrypt(READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
                break
            if not data:
                ended = True
                break
            plain.append(data)
        if self._outgoing.pending:  # a TLS 1.3 post-handshake answer (a key update)
            _send_all(self.sock, self._outgoing.read(), wait)
        if plain:
            return plain[0] if len(plain) == 1 else b"".join(plain)
        return None if ended else b""

    def write(self, data: bytes, wait: Callable[[int, int], None]) -> None:
        self._encrypt(data)
        _send_all(self.sock, self._outgoing.read(), wait)

    def close(self) -> None:
        self.sock.close()


class Relay:
    """One body's relay, from taking the connections over to giving them back (see the module)."""

    def __init__(
        self,
        source: asyncio.Transport,
        source_end: End,
        sink: asyncio.WriteTransport,
        sink_end: End,
        slot: threading.BoundedSemaphore,
    ) -> None:
        self.source = source
        self.sink = sink
        self.source_end = source_end
        self.sink_end = sink_end
        self.slot = slot
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.sink_closed = False
        self._resume: list[asyncio.Transport] = []
        self._ended = threading.Event()
        self._pollers: dict[tuple[int, int], select.poll] = {}

    async def run(self, body: Body) -> PumpResult:
        """Relay the rest of ``body``; the connections are the loop's again when this returns."""
        for end in (self.source_end, self.sink_end):
            if end.paused is not None and end.paused.is_reading():
                end.paused.pause_reading()
                self._resume.append(end.paused)
        loop = asyncio.get_running_loop()
        result: asyncio.Future[PumpResult] = loop.create_future()

        def relay() -> None:
            try:
                outcome = self._relay(body)
            except Exception as exc:  # a bug here must not leave the answer waiting for ever
                outcome = PumpResult(
                    PumpEnd.SOURCE_BROKE, f"the relay thread failed: {type(exc).__name__}: {exc}"
                )
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, result, outcome)

        _workers.run(relay)
        for transport in (self.source, self.sink):
            _holding[transport] = self
        try:
            return await result
        except asyncio.CancelledError:
            self.stop()
            raise
        finally:
            self._give_back()

    def stop(self) -> None:
        """End the thread now and wait for it: the loop may then close or reset either connection."""
        if not self._ended.is_set():
            os.eventfd_write(self.stop_fd, 1)
            self._ended.wait(STOP_WAIT_S)

    def _give_back(self) -> None:
        for transport in (self.source, self.sink):
            if _holding.get(transport) is self:
                del _holding[transport]
        if not self._ended.is_set():
            return  # never given back: it stays paused, and is closed by whoever cancelled
        os.close(self.stop_fd)
        for transport in self._resume:
            if not transport.is_closing():
                transport.resume_reading()

    def _gone(self, waiting_on_sink: bool) -> None:
        """On a tick: the loop may have closed either transport meanwhile."""
        if self.source.is_closing():
            raise SourceClosed("the connection the answer comes from was closed")
        if self.sink.is_closing() and not self.sink_closed:
            # Let the connection go now (a tunnel reset must reach its peer), but decide what the
            # sink's end means at the source's next bytes, as the callback pump does: a client that
            # closed at its own end marker missed only the body's last bytes.
            self.sink_closed = True
            self.sink_end.close()
        if self.sink_closed and waiting_on_sink:
            raise Stopped("the connection to pass the answer on to closed")

    def _poller(self, fd: int, events: int) -> select.poll:
        """One poll set per descriptor and events, kept: the cancel's eventfd is in each."""
        poller = self._pollers.get((fd, events))
        if poller is None:
            poller = self._pollers[fd, events] = select.poll()
            poller.register(fd, events)
            poller.register(self.stop_fd, select.POLLIN)
        return poller

    def _woken(self, ready: list[tuple[int, int]], waiting_on_sink: bool) -> None:
        """After a poll that was not just the descriptor waited on: :class:`Stopped` when cancelled;
        on a tick (nothing ready), what :meth:`_gone` finds."""
        if any(fd == self.stop_fd for fd, _ in ready):
            raise Stopped("cancelled")
        if not ready:
            self._gone(waiting_on_sink)

    def _wait(self, fd: int, events: int) -> None:
        """Wait until ``fd`` is ready for ``events``; :class:`Stopped` when cancelled or the sink is
        closed while we wait to write to it, :class:`SourceClosed` when the source's transport is."""
        poll = self._poller(fd, events).poll
        while True:
            ready = poll(TICK_MS)
            if len(ready) == 1 and ready[0][0] == fd:
                return
            self._woken(ready, waiting_on_sink=events == select.POLLOUT)
            if ready:
                return

    def _relay(self, body: Body) -> PumpResult:
        try:
            return self._pass_on(body)
        finally:
            self.source_end.close()
            if not self.sink_closed:
                self.sink_end.close()
            self.slot.release()
            self._ended.set()

    def _pass_on(self, body: Body) -> PumpResult:
        # Once per token: the bound methods are looked up once, and the usual wake-up (the source's
        # bytes alone) is told apart without a call.
        source = self.source_end
        source_fd = source.fd
        read = source.read
        write = self.sink_end.write
        feed = body.feed
        wait = self._wait
        sink_closing = self.sink.is_closing
        poll_source = self._poller(source_fd, select.POLLIN).poll
        ready = True  # the first read may find bytes the loop's transport had not taken yet
        while True:
            try:
                if not ready:
                    woken = poll_source(TICK_MS)
                    if len(woken) != 1 or woken[0][0] != source_fd:
                        self._woken(woken, waiting_on_sink=False)
                        if not woken:
                            continue
                data = read(wait)
            except Stopped as exc:
                return PumpResult(PumpEnd.SINK_LEFT, str(exc))
            except SourceClosed as exc:
                return PumpResult(PumpEnd.SOURCE_BROKE, str(exc))
            except OSError as exc:  # ssl.SSLError is one
                return PumpResult(PumpEnd.SOURCE_BROKE, f"{type(exc).__name__}: {exc}")
            if data is None:
                return stream_ended(body)
            ready = source.more
            if not data:
                continue
            try:
                out = feed(data)
            except BadBody as exc:
                return PumpResult(PumpEnd.SOURCE_BROKE, str(exc))
            if out:
                try:
                    if self.sink_closed or sink_closing():
                        raise Stopped("the connection to pass the answer on to closed")
                    write(out, wait)
                except (Stopped, SourceClosed, OSError) as exc:
                    return sink_gone(body, str(exc) or type(exc).__name__)
            if body.done:
                return PumpResult(PumpEnd.WHOLE)


_slots = threading.BoundedSemaphore(max(RELAY_THREADS, 1))
_holding: weakref.WeakKeyDictionary[asyncio.BaseTransport, Relay] = weakref.WeakKeyDictionary()


class _Workers:
    """Daemon threads that run relays, kept for the next one: a node that exits mid-answer is not held
    up by the answer's end (as by a ThreadPoolExecutor's), and a relay starts without a new thread.
    One is started when none is idle; the slots bound how many relays, so how many threads."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name="body-relay", daemon=True).start()

    def _work(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_workers = _Workers()


def _settle(future: asyncio.Future[PumpResult], result: PumpResult) -> None:
    if not future.done():
        future.set_result(result)


def end_of(transport: asyncio.BaseTransport, source: bool) -> End | None:
    """A thread's end of the transport's connection: a plain TCP socket's, or asyncio's TLS over TCP
    with its TLS state; None for any other transport (a QUIC stream) or state. A source, and any TLS
    connection, is paused while the thread has it; a plain sink is still read by the loop."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        state = tls_state(transport)
        return TlsEnd(sock, state) if state is not None else None
    if not isinstance(transport, asyncio.Transport):
        return None
    return SocketEnd(sock, transport if source else None)


def stop_relaying(transport: asyncio.BaseTransport) -> None:
    """Before the loop closes or resets a connection a relay may hold (a drain that ran out of time):
    end that relay first, so that no thread still uses the connection's TLS state."""
    relay = _holding.get(transport)
    if relay is not None:
        relay.stop()


def take_over(source: asyncio.Transport, sink: asyncio.WriteTransport, enabled: bool = True) -> Relay | None:
    """A relay for one body from ``source`` to ``sink``, or None when a thread cannot take it: relays
    are off or all busy, either transport is closing or is not one a thread can use, or the sink
    still holds bytes to send (they must go first)."""
    if not enabled or RELAY_THREADS <= 0:
        return None
    if source.is_closing() or sink.is_closing() or sink.get_write_buffer_size():
        return None
    if not _slots.acquire(blocking=False):
        return None
    source_end = sink_end = None
    try:
        source_end = end_of(source, source=True)
        sink_end = end_of(sink, source=False) if source_end is not None else None
    except OSError:
        pass
    if source_end is None or sink_end is None:
        for end in (source_end, sink_end):
            if end is not None:
                with contextlib.suppress(OSError):
                    end.close()
        _slots.release()
        return None
    return Relay(source, source_end, sink, sink_end, _slots)
