"""The mesh's fast data path: TLS 1.3 over TCP on a node's QUIC port number, for tunnels.

Tunnels carry many small messages in both directions (an SSE event per generated token, a ggml-rpc
round trip per token). aioquic does its per-packet work in Python, which cost ~0.5 ms of CPU per
token and per node here; TLS records are handled by OpenSSL. The fast path keeps the mesh's
security: the dialler pins the listener's certificate to the node id it expects, and presents its
grant and proves its own key with the same Hello frame as on QUIC; only then does the listener read
the tunnel's header frame and hand the connection to the handler registered for that header type -
and only if the grant (never the Hello's declared role) allows it: RPC tunnels are for members.
When the fast path cannot connect, callers fall back to a QUIC tunnel stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshllm.logsetup import Logger
from meshllm.net.preauth import MAX_HELLO_BYTES, Verdict, source_key
from meshllm.net.preauth_guard import PreAuthGuard
from meshllm.wire.admission import AuthError
from meshllm.wire.codec import MAX_MESSAGE_BYTES, CodecError, Message, MessageTooLarge, decode
from meshllm.wire.framing import LENGTH, StreamStalled, pack_frame, read_frame, read_frame_as
from meshllm.wire.gate import Gate
from meshllm.wire.identity import NodeIdentity, node_id_of, public_key_of_certificate
from meshllm.wire.messages import Hello, Refused

ALPN_FAST = "meshllm-fast/1"
CONNECT_TIMEOUT_S = 3.0
HEADER_TIMEOUT_S = 10.0
"""After admission: the tunnel's header frame (sent with the Hello by our dialler)."""
LISTEN_BACKLOG = 1024
"""Connections the kernel completes before we accept them (asyncio's default is 100): during a flood
the accept queue must not overflow and drop a real peer's SYN (a 1 s retransmission)."""

IDLE_TIMEOUT_S = float(os.environ.get("MESHLLM_FAST_IDLE_S", "60"))
"""A connection whose handler said it may carry another request (a pooled HTTP tunnel) is closed
after this long without one (``MESHLLM_FAST_IDLE_S``, for tests). Requesters keep idle connections for
less (``POOL_IDLE_S``)."""
POOL_IDLE_S = 20.0
POOL_PER_NODE = 8
"""Idle connections a requester keeps per node; more in flight at once are closed when done."""

FastHandler = Callable[[Any, Hello, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool | None]]
"""Serves one tunnel; True when the connection may carry another header frame (the next request)."""


def tls_contexts(identity: NodeIdentity) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client TLS 1.3 contexts from the node key. Certificates are self-signed: the
    client checks the server's key against the node id itself, the server checks the Hello."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.set_alpn_protocols([ALPN_FAST])
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads keys only from files
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(identity.certificate().public_bytes(serialization.Encoding.PEM))
        fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                identity.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # pinned to the node id after the handshake instead
    client.set_alpn_protocols([ALPN_FAST])
    return server, client


def tune_socket(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay for small frames, and TCP keepalive probes so a peer that vanishes without a
    reset (power loss, cable) is noticed in about 5 s rather than never."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        _tune_raw(sock)


def _tune_raw(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _wake(admitted: bool) -> Callable[[asyncio.Future[bool]], None]:
    """Resolve a queued connection's ticket: True, it holds a slot now; False, it waited too long."""

    def wake(ticket: asyncio.Future[bool]) -> None:
        if not ticket.done():
            ticket.set_result(admitted)

    return wake


class NothingListens(ConnectionError):
    """Every address of the node refused the TCP connection: its machine answered that nothing listens
    on the port, which is what a node whose process died looks like (a live node that could not open
    its fast path looks the same, so this is a reason to check, not a verdict)."""


class FastPath:
    """Listener and dialler of the fast path; lives on the transport's event loop."""

    def __init__(self, identity: NodeIdentity, gate: Gate, role: str, logger: Logger) -> None:
        self.identity = identity
        self.gate = gate
        self.role = role
        self.log = logger.bind(actor="fast-path")
        self._server_tls, self._client_tls = tls_contexts(identity)
        self._server: asyncio.base_events.Server | None = None
        self._handlers: dict[type[Message], tuple[FastHandler, bool]] = {}
        self.enabled = os.environ.get("MESHLLM_FAST_PATH", "1") != "0"
        self.guard: PreAuthGuard[asyncio.Future[bool]] | None = None
        self._pool: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = {}

    def register(self, header: type[Message], handler: FastHandler, passive_ok: bool) -> None:
        """Serve connections whose header frame is of this type (``passive_ok``: clients may use it)."""
        self._handlers[header] = (handler, passive_ok)

    async def listen(self, host: str, port: int) -> bool:
        """Listen on TCP. TLS starts only once the connection holds a pre-admission slot (asyncio's
        own TLS listener would run every handshake, for up to a minute, before we see the socket)."""
        loop = asyncio.get_running_loop()
        self.guard = PreAuthGuard("fast", self.log, loop, on_expire=_wake(False))
        try:
            self._server = await asyncio.start_server(self._serve, host, port, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            self.log.warning("fast_path.unavailable", port=port, reason=str(exc))
            return False
        return True

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for idle in self._pool.values():
            for _, writer, _ in idle:
                writer.close()
        self._pool.clear()

    async def take(
        self, node_id: str, addrs: tuple[str, ...], header: Message, then: bytes = b""
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """:meth:`open`, or an idle pooled connection to the node with ``header`` (and ``then``) sent
        on it; the last value says which (True: pooled). A pooled connection the node has closed in
        the meantime can still fail on its first read: the caller retries on a fresh one then
        (nothing was answered)."""
        idle = self._pool.get(node_id)
        now = time.monotonic()
        while idle:
            reader, writer, since = idle.pop()
            if now - since < POOL_IDLE_S and not writer.is_closing() and not reader.at_eof():
                writer.write(pack_frame(header) + then)
                return reader, writer, True
            writer.close()
        reader, writer = await self.open(node_id, addrs, header, then)
        return reader, writer, False

    def give_back(self, node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection whose answer ended where its framing said, ready for the next request."""
        idle = self._pool.setdefault(node_id, [])
        if writer.is_closing() or reader.at_eof() or len(idle) >= POOL_PER_NODE:
            writer.close()
            return
        idle.append((reader, writer, time.monotonic()))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        guard = self.guard
        assert guard is not None
        source = source_key(writer.get_extra_info("peername"))
        ticket: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        try:
            verdict = guard.arrive(source, ticket)
            if verdict is Verdict.REFUSE:
                return
            if verdict is Verdict.QUEUE and not await self._wait_for_slot(guard, source, ticket):
                return
            try:
                admitted, hello = await self._admit(guard, source, reader, writer)
            finally:
                for next_ticket in guard.release(source):
                    _wake(True)(next_ticket)
            if admitted is not None:
                await self._serve_admitted(admitted.node_id, admitted.role, hello, reader, writer)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _wait_for_slot(
        self, guard: PreAuthGuard[asyncio.Future[bool]], source: str, ticket: asyncio.Future[bool]
    ) -> bool:
        """Wait in the queue for a slot; False (counted) when none came in time."""
        try:
            return await asyncio.wait_for(asyncio.shield(ticket), guard.limiter.limits.queue_wait_s)
        except TimeoutError:
            if guard.withdraw(source, ticket):
                guard.note("queue_expired", source)
            elif ticket.done() and ticket.result():  # admitted just as the wait ended: give it back
                for next_ticket in guard.release(source):
                    _wake(True)(next_ticket)
            return False

    async def _admit(
        self,
        guard: PreAuthGuard[asyncio.Future[bool]],
        source: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> tuple[Any, Hello]:
        """TLS, then a Hello that verifies, within the deadline; (None, hello) when refused."""
        hello: Any = None
        try:
            async with asyncio.timeout(guard.deadline_s):
                await writer.start_tls(self._server_tls)
                tune_socket(writer)
                hello = await read_frame_as(reader, Hello, MAX_HELLO_BYTES)
                return self.gate.admit(hello), hello
        except AuthError as exc:
            peer = hello.node_id if isinstance(hello, Hello) else None
            guard.note(
                "bad_hello",
                source,
                event="auth.refused",
                peer=peer,
                reason=str(exc),
                side="listener",
                path="fast",
            )
            with contextlib.suppress(Exception):
                writer.write(pack_frame(Refused(reason=str(exc))))
                await asyncio.wait_for(writer.drain(), 1.0)
        except TimeoutError:
            guard.note("deadline", source)
        except (CodecError, ssl.SSLError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            guard.note("garbage", source, event="stream.rejected", kind="FAST", reason=reason)
        except (ConnectionError, OSError) as exc:
            guard.note("gone", source, reason=f"{type(exc).__name__}: {exc}")
        return None, hello

    async def _serve_admitted(
        self, peer: str, role: str, hello: Hello, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """An admitted connection: its tunnel header, then the handler its grant allows. A header that
        is not one, is over the cap, or is not complete in time drops the peer (this connection:
        ``peer.dropped``, as on QUIC, :mod:`meshllm.net.misbehaviour`)."""
        try:
            try:
                header = await asyncio.wait_for(read_frame(reader), HEADER_TIMEOUT_S)
            except TimeoutError:
                raise StreamStalled(f"no complete tunnel header within {HEADER_TIMEOUT_S:g} s") from None
            entry = self._handlers.get(type(header))
            if entry is None:
                raise AuthError(f"{type(header).__name__} is not served on the fast path")
            while True:
                handler, passive_ok = entry
                if role != "active" and not passive_ok:
                    raise AuthError(f"{type(header).__name__} is for members only: this connection is {role}")
                if not await handler(header, hello, reader, writer):
                    return
                following = await self._next_header(reader)
                if following is None:
                    return  # the requester closed its pooled connection, or left it idle
                header = following
                entry = self._handlers.get(type(header))
                if entry is None:
                    raise AuthError(f"{type(header).__name__} is not served on the fast path")
        except AuthError as exc:
            self.log.warning("auth.refused", peer=peer, reason=str(exc), side="listener", path="fast")
            with contextlib.suppress(Exception):
                writer.write(pack_frame(Refused(reason=str(exc))))
        except CodecError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.log.warning("peer.dropped", peer=peer, role=role, kind="FAST", path="fast", reason=reason)
            with contextlib.suppress(Exception):
                writer.write(pack_frame(Refused(reason=reason)))
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as exc:
            self.log.warning("stream.rejected", kind="FAST", reason=f"{type(exc).__name__}: {exc}")

    @staticmethod
    async def _next_header(reader: asyncio.StreamReader) -> Message | None:
        """The header frame of the next request on a kept connection; None when the requester closed it
        or sent nothing for :data:`IDLE_TIMEOUT_S` (both normal ends of a pooled connection)."""
        # asyncio.timeout, not wait_for: no task per request on a pooled connection
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                head = await reader.readexactly(LENGTH.size)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            return None
        (length,) = LENGTH.unpack(head)
        if length > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(f"frame length {length} over cap {MAX_MESSAGE_BYTES}")
        try:
            async with asyncio.timeout(HEADER_TIMEOUT_S):
                body = await reader.readexactly(length)
        except TimeoutError:
            raise StreamStalled(f"no complete tunnel header within {HEADER_TIMEOUT_S:g} s") from None
        except asyncio.IncompleteReadError:
            return None
        return decode(body)

    def _greeting(self, addr: str, node_id: str, der: bytes | None, header: Message) -> bytes:
        """Check the listener's certificate against the node id we dialled; then our Hello and the
        tunnel's header frame, the first bytes of every fast-path connection."""
        key = public_key_of_certificate(x509.load_der_x509_certificate(der)) if der else None
        if key is None or node_id_of(key) != node_id:
            raise AuthError(f"TLS certificate at {addr} does not belong to {node_id}")
        hello = self.gate.hello(self.role, node_id)
        return pack_frame(hello) + pack_frame(header)

    def open_blocking(self, node_id: str, addrs: tuple[str, ...], header: Message) -> ssl.SSLSocket:
        """:meth:`open` for a thread: a blocking TLS socket, checked, Hello and header sent. Byte
        relays on blocking sockets spend their time in C with the GIL released."""
        if not self.enabled:
            raise ConnectionError("fast path disabled (MESHLLM_FAST_PATH=0)")
        errors = []
        for addr in addrs:
            host, port = _split(addr)
            try:
                raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
                tls = self._client_tls.wrap_socket(raw, server_hostname=None)
            except (OSError, ssl.SSLError) as exc:
                errors.append(f"{addr}: {type(exc).__name__}: {exc}")
                continue
            try:
                greeting = self._greeting(addr, node_id, tls.getpeercert(binary_form=True), header)
            except AuthError:
                tls.close()
                raise
            tls.settimeout(HEADER_TIMEOUT_S)
            _tune_raw(tls)
            tls.sendall(greeting)
            return tls
        raise ConnectionError("; ".join(errors) or "no address")

    async def open(
        self, node_id: str, addrs: tuple[str, ...], header: Message, then: bytes = b""
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to a node's fast path, check its certificate, send Hello and the header, and
        ``then`` (the tunnel's first bytes) in the same write: one TLS record, one wake-up for the
        listener."""
        if not self.enabled:
            raise ConnectionError("fast path disabled (MESHLLM_FAST_PATH=0)")
        errors = []
        refused = 0
        for addr in addrs:
            host, port = _split(addr)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=self._client_tls, server_hostname=None),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{addr}: {type(exc).__name__}: {exc}")
                refused += isinstance(exc, ConnectionRefusedError)
                continue
            sslobj = writer.get_extra_info("ssl_object")
            try:
                greeting = self._greeting(
                    addr, node_id, sslobj.getpeercert(binary_form=True) if sslobj else None, header
                )
            except AuthError:
                writer.close()
                raise
            tune_socket(writer)
            writer.write(greeting + then)
            return reader, writer
        if addrs and refused == len(addrs):
            raise NothingListens("; ".join(errors))
        raise ConnectionError("; ".join(errors) or "no address")
