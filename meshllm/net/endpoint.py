"""The QUIC endpoint of a node: one aioquic server socket, outbound connections by node id, admission,
and the control-stream exchanges (gossip, death and leaving notices, probes).

It is plain asyncio code on its own loop thread. It owns connection state and nothing else: what it
learns becomes catalog messages told to the actors that own that knowledge (``registry``,
``heartbeat``), through the node's :class:`~actors.base.Directory`. The TransportBridge actor is
its only caller from the actor side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import connection as aioquic_connection
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives import serialization

from actors.base import Directory
from meshllm.logsetup import Logger
from meshllm.net.aio import LoopThread
from meshllm.net.fast_path import FastPath
from meshllm.wire.admission import AuthError, make_hello, verify_hello
from meshllm.wire.codec import CodecError, M, Message
from meshllm.wire.framing import (
    FrameError,
    PeerRefused,
    StreamKind,
    pack_frame,
    pack_stream_start,
    parse_kind,
    read_frame,
    read_frame_as,
)
from meshllm.wire.identity import NodeIdentity, node_id_of, public_key_of_certificate
from meshllm.wire.invite import MeshMembership
from meshllm.wire.messages import (
    Ack,
    ConnectionLost,
    Gossip,
    GossipFailed,
    GossipReceived,
    Hello,
    PeerDown,
    PeerDownReceived,
    PeerLeaving,
    PeerLeavingReceived,
    ProbeResult,
    Refused,
    RouteRequest,
    RoutesFailed,
    RoutesReceived,
    RouteTable,
    Seed,
    TransportStats,
)


def _slim_aioquic() -> None:
    """Per-connection memory, for active nodes holding thousands of passive connections (measured by
    tests/bench/bench_passive: ~76 KiB -> ~62 KiB each). aioquic 1.7.2 (pinned) keeps three 16 KiB
    TLS buffers per connection for its whole life, though our handshake messages (Ed25519 certificate)
    are under 1 KB; and it builds 33 identical frozensets per connection for its frame table."""
    aioquic_connection.CRYPTO_BUFFER_SIZE = 4096
    epochs = aioquic_connection.EPOCHS
    if not hasattr(epochs, "cache_info"):
        aioquic_connection.EPOCHS = functools.lru_cache(maxsize=None)(epochs)


_slim_aioquic()

ALPN = "meshllm/1"
SERVER_RCVBUF = 4 * 1024 * 1024
"""UDP receive buffer of the listening socket: a burst of route requests from many passive nodes
overflowed the default 208 KiB and turned into QUIC loss recovery (hundreds of ms)."""
CONTROL_TIMEOUT_S = 10.0
HELLO_DEADLINE_S = 10.0
IDLE_TIMEOUT_S = 60.0  # longer than a passive node's 30-60 s route refresh

TunnelHandler = Callable[["MeshConnection", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _same(conn: MeshConnection) -> MeshConnection:
    return conn


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


class MeshConnection(QuicConnectionProtocol):
    """One QUIC connection and what we know of the node at the other end."""

    def __init__(self, quic: QuicConnection, endpoint: MeshEndpoint, outbound: bool, **_: Any) -> None:
        super().__init__(quic, stream_handler=self._on_stream)
        self.endpoint = endpoint
        self.outbound = outbound
        self.peer_id: str | None = None  # verified: from the certificate (outbound) or the Hello (inbound)
        self.peer_role = "active"
        self.authenticated = asyncio.Event()
        self.auth_lock = asyncio.Lock()
        self.datagram_transport: asyncio.BaseTransport | None = None
        self.terminated = False
        if not outbound:
            # An inbound connection that never proves the mesh secret is closed, not kept.
            self._loop.call_later(HELLO_DEADLINE_S, self._close_if_unauthenticated)

    def _close_if_unauthenticated(self) -> None:
        if not self.authenticated.is_set() and not self.terminated:
            self.endpoint.log.warning("auth.timeout", reason="no Hello within deadline")
            self.close(reason_phrase="no Hello within deadline")

    @property
    def passive(self) -> bool:
        return self.peer_role != "active"

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.endpoint.spawn(self.endpoint.serve_stream(self, reader, writer))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamReset):
            reader = self._stream_readers.pop(event.stream_id, None)
            if reader is not None:
                reader.feed_eof()
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = True
            self.endpoint.on_terminated(self, event.reason_phrase or f"error {event.error_code}")
        super().quic_event_received(event)
        if isinstance(event, events.StreamDataReceived) and event.end_stream:
            # aioquic never forgets a stream's reader (~200 B a stream, forever); the stream's
            # handler holds its own reference, and no data comes after the end.
            self._stream_readers.pop(event.stream_id, None)

    async def ping(self) -> None:
        """aioquic's ping, but a waiter that fails after its caller gave up is not reported as an
        unretrieved exception."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        uid = id(waiter)
        self._ping_waiters[uid] = waiter
        self._quic.send_ping(uid)
        self.transmit()
        await asyncio.shield(waiter)

    def peer_certificate_id(self) -> str | None:
        cert = self._quic.tls._peer_certificate
        if cert is None:
            return None
        key = public_key_of_certificate(cert)
        return node_id_of(key) if key is not None else None


@dataclass
class _Counters:
    bytes_sent: Counter[str]
    frames_sent: Counter[str]
    frames_received: Counter[str]
    probes_sent: int = 0


class MeshEndpoint:
    """A node's QUIC endpoint. Public methods are coroutines meant to run on :attr:`loop`."""

    def __init__(
        self,
        identity: NodeIdentity,
        membership: MeshMembership,
        role: str,
        host: str,
        port: int,
        directory: Directory,
        logger: Logger,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.membership = membership
        self.role = role
        self.directory = directory
        self.log = logger.bind(actor="transport")
        self.host = host
        self._requested_port = port
        self.port = 0
        self.loop_thread = LoopThread(f"quic-{identity.node_id[:8]}")
        self.loop = self.loop_thread.loop
        self._server: QuicServer | None = None
        self.peers: dict[str, MeshConnection] = {}  # authenticated active peers by node id
        self._all: set[MeshConnection] = set()
        self._connecting: dict[str, asyncio.Future[MeshConnection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tunnel_handlers: dict[StreamKind, TunnelHandler] = {}
        self.gossip_snapshot = Gossip(announcements=())
        self.route_snapshot = RouteTable(models=(), unserved=(), actives=())
        self.control_timeout_s = CONTROL_TIMEOUT_S  # a control stream that stalls longer is closed
        self.fast = FastPath(identity, membership, role, self.log)
        self.notice_target = "registry" if role == "active" else "router"
        self.counters = _Counters(Counter(), Counter(), Counter())
        cert = identity.certificate()
        self._cert = cert
        self._key_pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # -- life cycle -----------------------------------------------------------------------------------

    def start(self) -> int:
        """Bind the UDP socket (blocking until bound) and return the port."""
        return self.loop_thread.run(self._start(), timeout=10)

    async def _start(self) -> int:
        config = self._configuration(is_client=False)
        self._server = await serve(
            self.host,
            self._requested_port,
            configuration=config,
            create_protocol=lambda quic, **kw: MeshConnection(quic, endpoint=self, outbound=False),
        )
        transport = self._server._transport
        assert transport is not None
        self.port = transport.get_extra_info("sockname")[1]
        if self.role == "active":
            await self.fast.listen(self.host, self.port)  # TCP, same port number
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SERVER_RCVBUF)
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                if granted < SERVER_RCVBUF:
                    self.log.info("transport.rcvbuf", requested=SERVER_RCVBUF, granted=granted)
        return self.port

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.loop_thread.run(self._stop(), timeout=5)
        self.loop_thread.stop()

    async def _stop(self) -> None:
        self.fast.close()
        for conn in list(self._all):
            self._close(conn)
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=IDLE_TIMEOUT_S,
            max_datagram_frame_size=None,
        )
        if is_client:
            # Peers use self-signed certificates; we check the key against the node id ourselves.
            config.verify_mode = ssl.CERT_NONE
        else:
            config.certificate = self._cert
            config.private_key = self.identity.private_key
        return config

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def register_tunnel(self, kind: StreamKind, handler: TunnelHandler) -> None:
        """Route incoming streams of a tunnel kind to a handler (HTTP and RPC tunnels)."""
        self._tunnel_handlers[kind] = handler

    # -- connection bookkeeping -------------------------------------------------------------------------

    def on_terminated(self, conn: MeshConnection, reason: str) -> None:
        self._all.discard(conn)
        if conn.datagram_transport is not None:
            self.loop.call_soon(conn.datagram_transport.close)
        peer = conn.peer_id
        if peer is not None and self.peers.get(peer) is conn:
            del self.peers[peer]
            self.log.info("connection.lost", peer=peer, reason=reason)
            lost = ConnectionLost(node_id=peer, reason=reason)
            self.directory.tell("registry", lost)
            self.directory.tell("heartbeat", lost)

    def _close(self, conn: MeshConnection) -> None:
        if not conn.terminated:
            conn.close()
        for reader in conn._stream_readers.values():
            reader.feed_eof()  # whoever waits on this connection learns now, not after QUIC's draining
        if conn.datagram_transport is not None:
            conn.datagram_transport.close()

    def _adopt(self, conn: MeshConnection) -> None:
        """Make an authenticated connection the one we use for its (active) peer."""
        assert conn.peer_id is not None
        if not conn.passive:
            self.peers[conn.peer_id] = conn

    def forget(self, node_id: str) -> None:
        """Close every connection to a node (it is dead to us)."""
        for conn in list(self._all):
            if conn.peer_id == node_id:
                self._all.discard(conn)
                self.peers.pop(node_id, None)
                self._close(conn)

    async def connect(self, node_id: str, addrs: tuple[str, ...], timeout: float) -> MeshConnection:
        """The connection we use for a node, dialling it (and checking its certificate) if needed."""
        existing = self.peers.get(node_id)
        if existing is not None and not existing.terminated:
            return existing
        pending = self._connecting.get(node_id)
        if pending is not None:
            return await asyncio.wait_for(asyncio.shield(pending), timeout)
        future: asyncio.Future[MeshConnection] = self.loop.create_future()
        self._connecting[node_id] = future
        try:
            conn = await asyncio.wait_for(self._dial(node_id, addrs, timeout), timeout)
            future.set_result(conn)
            return conn
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            future.exception()  # mark retrieved
            raise
        finally:
            self._connecting.pop(node_id, None)

    async def _dial(self, node_id: str, addrs: tuple[str, ...], timeout: float) -> MeshConnection:
        errors: list[str] = []
        for addr in addrs:
            try:
                host, port = split_addr(addr)
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                family, _, _, _, sockaddr = infos[0]
                config = self._configuration(is_client=True)
                config.server_name = node_id
                quic = QuicConnection(configuration=config)
                local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
                conn = MeshConnection(quic, endpoint=self, outbound=True)
                transport, _ = await self.loop.create_datagram_endpoint(
                    functools.partial(_same, conn), local_addr=local
                )
                conn.datagram_transport = transport
                self._all.add(conn)
                conn.connect(sockaddr)
                try:
                    await asyncio.wait_for(conn.wait_connected(), timeout)
                except BaseException:
                    self._all.discard(conn)
                    self._close(conn)
                    raise
                cert_id = conn.peer_certificate_id()
                if cert_id != node_id:
                    self._all.discard(conn)
                    self._close(conn)
                    raise AuthError(f"certificate at {addr} belongs to {cert_id}, not {node_id}")
                conn.peer_id = node_id
                return conn
            except AuthError:
                raise
            except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
                errors.append(f"{addr}: {type(exc).__name__} {exc}".strip())
        raise ConnectionError("; ".join(errors) or "no addresses")

    # -- sending ------------------------------------------------------------------------------------------

    def _count_out(self, kind: StreamKind, data: bytes, frames: int) -> None:
        self.counters.bytes_sent[kind.name] += len(data)
        self.counters.frames_sent[kind.name] += frames

    async def _open(
        self, conn: MeshConnection, kind: StreamKind, *msgs: Message
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await conn.create_stream()
        data = pack_stream_start(kind, *msgs)
        self._count_out(kind, data, len(msgs))
        writer.write(data)
        return reader, writer

    async def exchange_gossip(
        self, node_id: str, addrs: tuple[str, ...], gossip: Gossip, timeout: float
    ) -> None:
        """Connect if needed, authenticate on first use, swap gossip; tells the registry the outcome."""
        try:
            await asyncio.wait_for(self._exchange_gossip(node_id, addrs, gossip), timeout)
        except (PeerRefused, AuthError) as exc:
            reason = exc.reason if isinstance(exc, PeerRefused) else str(exc)
            self.log.warning("auth.refused", peer=node_id, reason=reason, side="dialler")
            self.directory.tell("registry", GossipFailed(node_id=node_id, addrs=addrs, reason=reason))
        except (OSError, ConnectionError, TimeoutError, CodecError) as exc:
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self.directory.tell("registry", GossipFailed(node_id=node_id, addrs=addrs, reason=reason))

    async def _control_exchange(
        self, node_id: str, addrs: tuple[str, ...], kind: StreamKind, body: Message, reply_type: type[M]
    ) -> M:
        """One request/response on a new control stream; the first on a connection carries Hellos."""
        conn = await self.connect(node_id, addrs, timeout=CONTROL_TIMEOUT_S)
        if not conn.authenticated.is_set():
            async with conn.auth_lock:
                if not conn.authenticated.is_set():
                    hello = make_hello(self.identity, self.membership, self.role, node_id)
                    reader, writer = await self._open(conn, kind, hello, body)
                    writer.write_eof()
                    answer = await read_frame_as(reader, Hello)
                    verify_hello(answer, self.membership, self.node_id, expected_node=node_id)
                    conn.peer_role = answer.role
                    conn.authenticated.set()
                    reply = await read_frame_as(reader, reply_type)
                    self._adopt(conn)
                    return reply
        reader, writer = await self._open(conn, kind, body)
        writer.write_eof()
        reply = await read_frame_as(reader, reply_type)
        self._adopt(conn)
        return reply

    async def _exchange_gossip(self, node_id: str, addrs: tuple[str, ...], gossip: Gossip) -> None:
        reply = await self._control_exchange(node_id, addrs, StreamKind.GOSSIP, gossip, Gossip)
        self.directory.tell("registry", GossipReceived(peer_id=node_id, announcements=reply.announcements))

    async def _exchange_routes(self, node_id: str, addrs: tuple[str, ...]) -> None:
        reply = await self._control_exchange(
            node_id, addrs, StreamKind.ROUTE_REQUEST, RouteRequest(), RouteTable
        )
        self.directory.tell("router", RoutesReceived(source=node_id, table=reply))

    async def _authenticate(self, node_id: str, addrs: tuple[str, ...]) -> None:
        """Meet a node: active nodes gossip, passive ones ask for routes (and are never registered)."""
        if self.role == "active":
            await self._exchange_gossip(node_id, addrs, self.gossip_snapshot)
        else:
            await self._exchange_routes(node_id, addrs)

    async def refresh_routes(self, actives: tuple[Seed, ...], timeout: float) -> None:
        """Passive side: ask the first active node that answers for the routing table."""
        errors = []
        for seed in random.sample(list(actives), len(actives)):
            try:
                await asyncio.wait_for(self._exchange_routes(seed.node_id, seed.addrs), timeout)
                return
            except (PeerRefused, AuthError) as exc:
                reason = exc.reason if isinstance(exc, PeerRefused) else str(exc)
                self.log.warning("auth.refused", peer=seed.node_id, reason=reason, side="dialler")
                errors.append(f"{seed.node_id[:12]}: refused: {reason}")
            except (OSError, ConnectionError, TimeoutError, CodecError) as exc:
                errors.append(f"{seed.node_id[:12]}: {type(exc).__name__}: {exc}".rstrip(": "))
        self.directory.tell("router", RoutesFailed(reason="; ".join(errors) or "no active node known"))

    async def open_tunnel(
        self, node_id: str, addrs: tuple[str, ...], kind: StreamKind, header: Message, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a tunnel stream to a node (connecting and authenticating first if needed) and send its
        header frame; the caller then moves raw bytes."""
        conn = self.peers.get(node_id)
        if conn is None or conn.terminated:
            await asyncio.wait_for(self._authenticate(node_id, addrs), timeout)
            conn = self.peers[node_id]
        return await self._open(conn, kind, header)

    async def ping_peer(self, node_id: str, timeout: float) -> None:
        """A QUIC-level ping on our connection to a node; raises if there is none or no answer."""
        conn = self.peers.get(node_id)
        if conn is None or conn.terminated:
            raise ConnectionError(f"no connection to {node_id[:12]}")
        await asyncio.wait_for(conn.ping(), timeout)

    async def probe(self, node_id: str, addrs: tuple[str, ...], timeout: float) -> None:
        """Ping a peer at the QUIC level (re-dialling with a gossip exchange if we hold no connection)."""
        started = time.monotonic()
        self.counters.probes_sent += 1
        try:
            conn = self.peers.get(node_id)
            if conn is None or conn.terminated:
                await asyncio.wait_for(self._exchange_gossip(node_id, addrs, self.gossip_snapshot), timeout)
            else:
                await asyncio.wait_for(conn.ping(), timeout)
            result = ProbeResult(node_id=node_id, ok=True, rtt_ms=(time.monotonic() - started) * 1000)
        except (TimeoutError, OSError, ConnectionError, CodecError, PeerRefused, AuthError) as exc:
            result = ProbeResult(node_id=node_id, ok=False, rtt_ms=0.0, error=f"{type(exc).__name__}: {exc}")
        self.directory.tell("heartbeat", result)

    async def broadcast_peer_down(self, notice: PeerDown) -> None:
        """Push a death notice down every authenticated connection (active and passive), then drop the
        dead node's connections."""
        self.forget(notice.node_id)
        await self._notify_all(StreamKind.PEER_DOWN, notice, wait_ack=False, timeout=2.0)

    async def leave(self, notice: PeerLeaving, timeout: float) -> None:
        """Tell everyone we are leaving, wait (bounded) for their acks, and close every connection."""
        await self._notify_all(StreamKind.PEER_LEAVING, notice, wait_ack=True, timeout=timeout)
        for conn in list(self._all):
            self._close(conn)

    async def _notify_all(self, kind: StreamKind, msg: Message, wait_ack: bool, timeout: float) -> None:
        targets = [c for c in self._all if c.authenticated.is_set() and not c.terminated]

        async def one(conn: MeshConnection) -> None:
            reader, writer = await self._open(conn, kind, msg)
            writer.write_eof()
            if wait_ack:
                await read_frame_as(reader, Ack)

        if not targets:
            return
        results = await asyncio.wait(
            [asyncio.ensure_future(asyncio.wait_for(one(c), timeout)) for c in targets], timeout=timeout
        )
        for task in results[0]:
            task.exception()  # failures to reach a peer are expected on shutdown/death

    def stats(self) -> TransportStats:
        auth = [c for c in self._all if c.authenticated.is_set() and not c.terminated]
        return TransportStats(
            connections=len(auth),
            passive_connections=sum(1 for c in auth if c.passive),
            bytes_sent=dict(self.counters.bytes_sent),
            frames_sent=dict(self.counters.frames_sent),
            frames_received=dict(self.counters.frames_received),
            probes_sent=self.counters.probes_sent,
        )

    # -- receiving ----------------------------------------------------------------------------------------

    async def serve_stream(
        self, conn: MeshConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Handle one stream the other side opened."""
        self._all.add(conn)  # inbound connections are tracked from their first stream
        kind: StreamKind | None = None
        try:
            kind = parse_kind(await reader.read(1))
            handler = self._tunnel_handlers.get(kind)
            if handler is not None:
                await self._await_auth(conn)
                await handler(conn, reader, writer)
                return
            await asyncio.wait_for(self._serve_control(conn, kind, reader, writer), self.control_timeout_s)
        except AuthError as exc:
            self.log.warning("auth.refused", peer=conn.peer_id, reason=str(exc), side="listener")
            writer.write(pack_frame(Refused(reason=str(exc))))
        except (CodecError, TimeoutError) as exc:
            reason = "stalled" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            self.log.warning(
                "stream.rejected", peer=conn.peer_id, kind=kind.name if kind else None, reason=reason
            )
            with contextlib.suppress(Exception):
                writer.write(pack_frame(Refused(reason=reason)))
        except (ConnectionError, OSError) as exc:
            self.log.info("stream.broken", peer=conn.peer_id, reason=str(exc))
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    def _answer(
        self, writer: asyncio.StreamWriter, kind: StreamKind, hello: Hello | None, reply: Message
    ) -> None:
        """The reply to a control request, preceded by our Hello when theirs opened the connection."""
        frames = [reply] if hello is None else [hello, reply]
        data = b"".join(pack_frame(m) for m in frames)
        self._count_out(kind, data, len(frames))
        writer.write(data)

    async def _await_auth(self, conn: MeshConnection) -> None:
        if conn.authenticated.is_set():
            return
        if not conn.outbound:
            raise AuthError("authenticate first: the first stream must carry a Hello")
        # We dialled and our Hello exchange is still in flight; the listener may already talk to us.
        try:
            await asyncio.wait_for(conn.authenticated.wait(), CONTROL_TIMEOUT_S)
        except TimeoutError:
            raise AuthError("connection never authenticated") from None

    async def _serve_control(
        self,
        conn: MeshConnection,
        kind: StreamKind,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        first = await read_frame(reader)
        self.counters.frames_received[kind.name] += 1
        reply_hello: Hello | None = None
        if isinstance(first, Hello):
            if kind not in (StreamKind.GOSSIP, StreamKind.ROUTE_REQUEST):
                raise AuthError(f"Hello is not accepted on a {kind.name} stream")
            verify_hello(first, self.membership, self.node_id)
            if conn.peer_id is not None and conn.peer_id != first.node_id:
                raise AuthError("connection already belongs to another node")
            conn.peer_id = first.node_id
            conn.peer_role = "passive" if kind == StreamKind.ROUTE_REQUEST else first.role
            conn.authenticated.set()
            reply_hello = make_hello(self.identity, self.membership, self.role, first.node_id)
            body = await read_frame(reader)
        else:
            await self._await_auth(conn)
            body = first
        peer = conn.peer_id
        assert peer is not None
        if kind == StreamKind.GOSSIP:
            if not isinstance(body, Gossip):
                raise FrameError(f"expected Gossip, got {type(body).__name__}")
            if conn.passive or self.role != "active":
                raise AuthError("passive nodes do not gossip")
            self._adopt(conn)
            self.directory.tell("registry", GossipReceived(peer_id=peer, announcements=body.announcements))
            self._answer(writer, kind, reply_hello, self.gossip_snapshot)
        elif kind == StreamKind.ROUTE_REQUEST:
            if not isinstance(body, RouteRequest):
                raise FrameError(f"expected RouteRequest, got {type(body).__name__}")
            if self.role != "active":
                raise AuthError("this node is passive: ask an active node for routes")
            self._answer(writer, kind, reply_hello, self.route_snapshot)
        elif kind == StreamKind.PEER_DOWN:
            if not isinstance(body, PeerDown):
                raise FrameError(f"expected PeerDown, got {type(body).__name__}")
            self.directory.tell(self.notice_target, PeerDownReceived(notice=body, from_peer=peer))
            if self.role != "active":
                self.forget(body.node_id)  # a passive node has no heartbeat: the notice is its signal
            writer.write(pack_frame(Ack()))
        elif kind == StreamKind.PEER_LEAVING:
            if not isinstance(body, PeerLeaving):
                raise FrameError(f"expected PeerLeaving, got {type(body).__name__}")
            if body.node_id != peer:
                raise AuthError("a node can only announce its own leaving")
            self.directory.tell("registry", PeerLeavingReceived(notice=body))
            writer.write(pack_frame(Ack()))
        else:
            raise FrameError(f"{kind.name} streams are not served by this node")
