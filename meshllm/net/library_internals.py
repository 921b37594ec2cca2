"""Every place meshllm reaches into aioquic's internals, in one module, for the one version pinned.

aioquic 1.7.2 (and asyncio, and aiohttp) have no public way to do twelve things we need:

- keep per-connection memory small for active nodes that hold thousands of passive connections
  (module globals ``CRYPTO_BUFFER_SIZE`` and ``EPOCHS``: see :func:`slim_aioquic`);
- tell a stream's reader about a reset and forget finished readers (``_stream_readers``);
- a ping, and a wait for the handshake, that can be abandoned (a dial's timeout) without an
  "exception never retrieved" report when the connection later fails (``_ping_waiters`` with the
  connection's ``send_ping``; ``_connected_waiter`` and ``_connected``);
- read the peer's certificate to pin it to the node id it claims (``tls._peer_certificate``);
- learn that the peer closed a connection when its close arrives, not when the draining period after
  it ends (three probe timeouts: seconds on a loaded path), and fail the pings that wait on it
  (``_quic._state``, ``_quic._close_event``, ``_ping_waiters``: see :func:`close_received`);
- stop a tunnel stream whose reader went away (STOP_SENDING from the stream adapter: ``_quic``);
- read every datagram waiting on the server socket when it is readable, not one a loop iteration
  (asyncio's selector datagram transport: ``_loop``, ``_sock``, ``_sock_fd``, ``_protocol``; see
  :func:`drain_datagrams`);
- send a body that is already chunked (llama-server's, passed through untouched) on an aiohttp
  response whose headers say chunked, without aiohttp framing each write again
  (``StreamWriter.chunked``: see :func:`send_chunks_as_they_are`);
- send a streamed response's head together with its first body bytes (``StreamResponse``'s
  ``_send_headers_immediately``: see :func:`send_head_with_first_write`);
- take what an asyncio stream has buffered without waiting, before a body pump takes its connection
  over (``StreamReader._buffer``: see :func:`take_buffered`);
- relay a body on a TLS connection from a thread (:mod:`meshllm.net.thread_relay`) with the
  connection's own TLS state: asyncio's TLS transport keeps its SSL object, memory BIOs and the TCP
  transport under it in ``_ssl_protocol`` (``_sslobj``, ``_incoming``, ``_outgoing``, ``_transport``,
  ``_state``, ``_write_buffer_size``, ``_ssl_reading_paused``; see :func:`tls_state`);
- count and queue connections before the server creates them (:mod:`meshllm.net.quic_listener`):
  whether a datagram would create one - an Initial with a valid Retry token for an unknown
  connection id (``QuicServer._protocols``, ``_retry``, ``_configuration``, ``_loop``) - and the
  connection it created.

The versions are checked when this module is imported: on any other aioquic the node refuses to
start with a message saying so, rather than misbehave quietly. tests/test_library_internals.py
checks each patch's effect, so an upgrade shows at once which ones still hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
from asyncio import sslproto
from dataclasses import dataclass
from importlib.metadata import version

from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.web import StreamResponse
from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import connection as aioquic_connection
from aioquic.quic import events as aioquic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509

PINNED = {"aioquic": "1.7.2"}
AIOHTTP_CHECKED = "3.14"
"""The aiohttp release whose payload writer :func:`send_chunks_as_they_are` was checked against
(tests/test_library_internals.py checks its effect on whichever is installed)."""


class LibraryVersionError(ImportError):
    """An installed library is not the version whose internals this module knows."""


def check_versions(pinned: dict[str, str] = PINNED) -> None:
    for name, wanted in pinned.items():
        found = version(name)
        if found != wanted:
            raise LibraryVersionError(
                f"meshllm needs {name}=={wanted} (it relies on internals of that version, see "
                f"meshllm/net/library_internals.py); {found} is installed. Reinstall meshllm's pinned "
                f"dependencies: pip install -e . (or scripts/bootstrap.sh)"
            )


check_versions()

CRYPTO_BUFFER_BYTES = 4096


def slim_aioquic() -> None:
    """Per-connection memory (tests/bench/bench_passive: ~76 KiB -> ~62 KiB each). aioquic keeps
    three 16 KiB TLS buffers per connection for its whole life, though our handshake messages
    (Ed25519 certificate) are under 1 KB; and it builds 33 identical frozensets per connection for
    its frame table. Idempotent."""
    aioquic_connection.CRYPTO_BUFFER_SIZE = CRYPTO_BUFFER_BYTES
    epochs = aioquic_connection.EPOCHS
    if not hasattr(epochs, "cache_info"):
        aioquic_connection.EPOCHS = functools.lru_cache(maxsize=None)(epochs)


def stream_readers(protocol: QuicConnectionProtocol) -> dict[int, asyncio.StreamReader]:
    """The readers aioquic keeps per stream id (it never removes them by itself)."""
    readers: dict[int, asyncio.StreamReader] = protocol._stream_readers
    return readers


async def quiet_ping(protocol: QuicConnectionProtocol) -> None:
    """aioquic's ``ping()``, but a waiter that fails after its caller gave up (a timeout around this
    call) is not reported as an unretrieved exception."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
    uid = id(waiter)
    protocol._ping_waiters[uid] = waiter
    protocol._quic.send_ping(uid)
    protocol.transmit()
    await asyncio.shield(waiter)


async def quiet_wait_connected(protocol: QuicConnectionProtocol) -> None:
    """aioquic's ``wait_connected()``, but when the caller gives up on the handshake and the connection
    fails afterwards, its waiter is not reported as an unretrieved ``ConnectionError``."""
    if protocol._connected:
        return
    if protocol._connected_waiter is not None:
        raise RuntimeError("Already awaiting connected")
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
    protocol._connected_waiter = waiter
    await asyncio.shield(waiter)


def close_received(protocol: QuicConnectionProtocol) -> aioquic_events.ConnectionTerminated | None:
    """The peer's close, once it has arrived: aioquic then only drains the connection (it answers
    nothing) and reports :class:`ConnectionTerminated` when the draining ends. None otherwise."""
    quic = protocol._quic
    if quic._state is not aioquic_connection.QuicConnectionState.DRAINING:
        return None
    event: aioquic_events.ConnectionTerminated | None = quic._close_event
    return event


def fail_pings(protocol: QuicConnectionProtocol) -> None:
    """Fail every ping that waits on this connection with ConnectionError (as aioquic does when the
    connection terminates): no answer can come on a connection the peer closed."""
    waiters: dict[int, asyncio.Future[None]] = protocol._ping_waiters
    for waiter in waiters.values():
        if not waiter.done():
            waiter.set_exception(ConnectionError("the peer closed the connection"))
    waiters.clear()


def peer_certificate(protocol: QuicConnectionProtocol) -> x509.Certificate | None:
    """The certificate the other side presented in the TLS handshake (None before it, or for a
    client, which aioquic's server cannot ask for one)."""
    cert: x509.Certificate | None = protocol._quic.tls._peer_certificate
    return cert


TUNNEL_ABANDONED = 0x10  # the application error code a gateway sends when its client went away


def send_chunks_as_they_are(writer: AbstractStreamWriter) -> None:
    """After ``prepare()`` of a response with chunked encoding enabled: write bodies as given. The
    caller's bytes are already chunk-framed (including the last, empty chunk), so aiohttp's own
    framing - a size line and a CRLF around every write - must not be added. aiohttp's writer sends
    no terminator at ``write_eof()`` once ``chunked`` is off."""
    if not isinstance(writer, StreamWriter) or not hasattr(writer, "chunked"):
        raise LibraryVersionError(f"aiohttp {version('aiohttp')}: the payload writer has no 'chunked' switch")
    writer.chunked = False


def send_head_with_first_write(response: StreamResponse) -> None:
    """Before ``prepare()``: keep the response head until the first body write (or ``write_eof``) and
    send both in one write. aiohttp does so for a ``web.Response``; a ``StreamResponse`` sends its
    head at once, one more packet and one more wake-up for the client per answer, though a relay
    prepares it only when its first bytes are there anyway."""
    if not hasattr(response, "_send_headers_immediately"):
        raise LibraryVersionError(f"aiohttp {version('aiohttp')}: StreamResponse has no head-sending switch")
    response._send_headers_immediately = False


def take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool, BaseException | None]:
    """What an asyncio stream has read that nobody has taken yet (now taken), whether its end has come,
    and the error it ended with. asyncio has no public read that never waits (``StreamReader._buffer``):
    :mod:`meshllm.net.body_pump` empties the stream before it takes the connection over."""
    buffer = reader._buffer  # type: ignore[attr-defined]
    held = bytes(buffer)
    buffer.clear()
    return held, reader.at_eof(), reader.exception()


@dataclass(frozen=True)
class TlsState:
    """A TLS connection's state as asyncio's TLS transport holds it."""

    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    tcp: asyncio.Transport
    """The TCP transport under the TLS one: the one that reads the socket."""


def tls_state(transport: asyncio.BaseTransport) -> TlsState | None:
    """The TLS state of asyncio's TLS transport when it carries data (handshake done, not closing) and
    holds nothing it has not sent; None for any other transport, or one in another state. While a
    thread uses it the loop must not: the TCP transport is paused, and nothing is written."""
    protocol = getattr(transport, "_ssl_protocol", None)
    if not isinstance(protocol, sslproto.SSLProtocol):
        return None
    sslobj = getattr(protocol, "_sslobj", None)
    incoming = getattr(protocol, "_incoming", None)
    outgoing = getattr(protocol, "_outgoing", None)
    tcp = getattr(protocol, "_transport", None)
    if not isinstance(sslobj, ssl.SSLObject) or not isinstance(tcp, asyncio.Transport):
        return None
    if not isinstance(incoming, ssl.MemoryBIO) or not isinstance(outgoing, ssl.MemoryBIO):
        return None
    if getattr(protocol, "_state", None) is not sslproto.SSLProtocolState.WRAPPED:
        return None
    if outgoing.pending or getattr(protocol, "_write_buffer_size", 1) or tcp.get_write_buffer_size():
        return None
    if getattr(protocol, "_ssl_reading_paused", True):  # it resumes its TCP transport itself
        return None
    return TlsState(sslobj, incoming, outgoing, tcp)


def abort_tunnel(writer: asyncio.StreamWriter) -> None:
    """Tell the far end of a tunnel that nobody reads its answer any more, so it stops producing it.

    A QUIC stream gets STOP_SENDING (and our side is reset): the host's next write fails at once, it
    closes its llama-server connection, and the generation stops. aioquic's stream adapter has no
    public way to do this. A TCP (fast path) stream is aborted with a reset (SO_LINGER 0), not closed:
    the far end's next read or write fails, where a FIN would read as the answer's normal end.
    """
    transport = writer.transport
    protocol = getattr(transport, "protocol", None)
    stream_id = getattr(transport, "stream_id", None)
    if isinstance(protocol, QuicConnectionProtocol) and isinstance(stream_id, int):
        quic = protocol._quic
        for stop in (quic.stop_stream, quic.reset_stream):
            try:
                stop(stream_id, TUNNEL_ABANDONED)
            except (ValueError, AssertionError, RuntimeError):
                pass  # that direction was already finished or reset
        protocol._transmit_soon()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:  # a reset, not a FIN: the far end must not take the cut for a whole answer
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def new_connection_attempt(server: QuicServer, data: bytes, addr: tuple[str, int]) -> bytes | None:
    """The destination connection id when this datagram would make aioquic's server create a
    connection, else None. With retry on, only an Initial carrying a valid Retry token does (its
    source address is then proven: it received our Retry); one without a token is answered with a
    Retry by aioquic and creates nothing."""
    config = server._configuration
    if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
        return None
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=config.connection_id_length)
    except ValueError:
        return None
    if header.packet_type != QuicPacketType.INITIAL or header.version not in config.supported_versions:
        return None
    cid: bytes = header.destination_cid
    if cid in server._protocols:
        return None
    if server._retry is not None:
        if not header.token:
            return None
        try:
            server._retry.validate_token(
                address=addr, destination_cid=cid, token=header.token, now=server._loop.time()
            )
        except ValueError:
            return None
    return cid


def server_protocol(server: QuicServer, cid: bytes) -> QuicConnectionProtocol | None:
    """The connection aioquic's server keeps under this connection id, if any."""
    proto: QuicConnectionProtocol | None = server._protocols.get(cid)
    return proto


def retry_enabled(server: QuicServer) -> bool:
    """Whether the server validates client addresses with a Retry before creating connections."""
    return server._retry is not None


def drain_datagrams(transport: asyncio.DatagramTransport, per_wake: int) -> None:
    """Make an asyncio UDP transport read up to ``per_wake`` datagrams each time its socket is
    readable, instead of one (asyncio's ``_SelectorDatagramTransport._read_ready``). With one a loop
    iteration, every callback of that iteration - a storm's replies, paced notices - runs between two
    reads, the socket's queue grows past its buffer and the kernel drops datagrams (QUIC then resends
    them after a timeout, and a member's probe answers wait in the same queue)."""
    loop = transport._loop  # type: ignore[attr-defined]
    sock = transport._sock  # type: ignore[attr-defined]
    fd = transport._sock_fd  # type: ignore[attr-defined]
    max_size = transport.max_size  # type: ignore[attr-defined]

    def read_ready() -> None:
        for _ in range(per_wake):
            if transport._conn_lost:  # type: ignore[attr-defined]
                return
            try:
                data, addr = sock.recvfrom(max_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                transport._protocol.error_received(exc)  # type: ignore[attr-defined]
                return
            transport._protocol.datagram_received(data, addr)  # type: ignore[attr-defined]

    loop._remove_reader(fd)
    loop._add_reader(fd, read_ready)
