"""The QUIC endpoint of a node: one aioquic server socket, outbound connections by node id, and the
client side of the control exchanges (gossip, route requests, probes, death and leaving notices).
What the other side opens is served by :mod:`meshllm.net.control_server`.

It is plain asyncio code on its own loop thread. It owns connection state and nothing else: what it
learns becomes catalog messages told to the actors that own that knowledge (``registry``,
``heartbeat``, ``router``), through the node's :class:`~actors.base.Directory`.

Who owns it: the :class:`~meshllm.node.Node` creates, starts and finally stops it. The actors reach
it only through the TransportBridge actor, by messages. The data plane (gateway, HTTP and RPC
tunnels) runs on its loop and calls its tunnel-opening methods directly, because bytes never pass
through actors. What it answers with comes from the actors that own it (:class:`Published`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import serialization

from actors.base import Directory
from meshllm.logsetup import Logger
from meshllm.net import library_internals
from meshllm.net.aio import LoopThread
from meshllm.net.connection import MeshConnection
from meshllm.net.control_server import CONTROL_TIMEOUT_S, ControlServer, TunnelHandler
from meshllm.net.dialler import dial
from meshllm.net.fast_path import FastPath
from meshllm.net.loop_watch import LoopWatch
from meshllm.net.notices import finish_introductions, send_notices
from meshllm.net.preauth_guard import PreAuthGuard
from meshllm.net.published import Counters, Published
from meshllm.net.quic_listener import GuardedQuicServer
from meshllm.net.revocation import Revocations
from meshllm.routing import model_list, route_reply, without_dead_host
from meshllm.wire.admission import AuthError
from meshllm.wire.codec import CodecError, M, Message
from meshllm.wire.framing import (
    PeerRefused,
    StreamKind,
    pack_frame,
    pack_stream_start,
    read_frame_as,
)
from meshllm.wire.gate import Gate
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.messages import (
    ConnectionLost,
    Gossip,
    GossipFailed,
    GossipReceived,
    Hello,
    LoopPulse,
    ModelList,
    PeerDown,
    PeerLeaving,
    ProbeResult,
    RouteReply,
    RouteRequest,
    RoutesFailed,
    RouteSnapshot,
    RoutesReceived,
    RouteTable,
    Seed,
    TransportStats,
)

library_internals.slim_aioquic()

ALPN = "meshllm/1"
SERVER_RCVBUF = 4 * 1024 * 1024
EPHEMERAL_PORT_ATTEMPTS = 8
"""UDP receive buffer of the listening socket: a burst of route requests from many passive nodes
overflowed the default 208 KiB and turned into QUIC loss recovery (hundreds of ms)."""
SERVER_READS_PER_WAKE = 256
"""Datagrams the server socket reads each time it is readable (asyncio reads one a loop iteration)."""
IDLE_TIMEOUT_S = 60.0  # longer than a passive node's 30-60 s route refresh


class MeshEndpoint:
    """A node's QUIC endpoint. Public methods are coroutines meant to run on :attr:`loop`."""

    def __init__(
        self,
        identity: NodeIdentity,
        gate: Gate,
        role: str,
        host: str,
        port: int,
        directory: Directory,
        logger: Logger,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.gate = gate
        self.role = role
        self.directory = directory
        self.log = logger.bind(actor="transport")
        self.host = host
        self._requested_port = port
        self.port = 0
        self.loop_thread = LoopThread(f"quic-{identity.node_id[:8]}")
        self.loop = self.loop_thread.loop
        self._server: GuardedQuicServer | None = None
        self.peers: dict[str, MeshConnection] = {}  # authenticated active peers by node id
        self._all: set[MeshConnection] = set()
        self._connecting: dict[str, asyncio.Future[MeshConnection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        empty = RouteTable(models=(), unserved=(), actives=())
        self.published = Published(
            gossip=Gossip(announcements=()), route_table=empty, route_frame=pack_frame(empty)
        )
        self.control = ControlServer(self)
        self.fast = FastPath(identity, gate, role, self.log)
        self.revocations = Revocations(self)
        self.notice_target = "registry" if role == "active" else "router"
        self.loop_watch = LoopWatch(self.loop, self._pulse)
        self._pulse_target = ""
        self.counters = Counters(Counter(), Counter(), Counter())
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
        # An ephemeral UDP port can be taken on TCP (another program's outgoing connection): with
        # port 0 we draw again until both the QUIC and the fast-path port number are ours.
        attempts = EPHEMERAL_PORT_ATTEMPTS if self._requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            transport = await self._bind_quic()
            if self.role != "active" or await self.fast.listen(self.host, self.port):
                break
            if attempt < attempts:
                transport.close()
                self.log.info("transport.port_redrawn", port=self.port, reason="tcp port taken")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SERVER_RCVBUF)
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                if granted < SERVER_RCVBUF:
                    self.log.info("transport.rcvbuf", requested=SERVER_RCVBUF, granted=granted)
        return self.port

    async def _bind_quic(self) -> asyncio.DatagramTransport:
        config = self.configuration(is_client=False)
        transport, self._server = await self.loop.create_datagram_endpoint(
            lambda: GuardedQuicServer(
                configuration=config,
                create_protocol=lambda quic, **kw: MeshConnection(quic, endpoint=self, outbound=False),
                log=self.log,
            ),
            local_addr=(self.host, self._requested_port),
        )
        self.port = transport.get_extra_info("sockname")[1]
        library_internals.drain_datagrams(transport, SERVER_READS_PER_WAKE)
        return transport

    def pulse_to(self, subscriber: str) -> None:
        """Tell ``subscriber`` (the heartbeat) this loop's pulse from now on (:mod:`.loop_watch`)."""
        self._pulse_target = subscriber
        self.loop_watch.close()
        self.loop_watch.start()

    def _pulse(self, lost_s: float) -> None:
        if self._pulse_target:
            self.directory.tell(self._pulse_target, LoopPulse(lost_s=lost_s))

    @property
    def quic_guard(self) -> PreAuthGuard[Any] | None:  # counts before admission, once started
        return self._server.guard if self._server is not None else None

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.loop_thread.run(self._stop(), timeout=5)
        self.loop_thread.stop()

    async def _stop(self) -> None:
        self.loop_watch.close()
        self.fast.close()
        self.revocations.close()
        for conn in list(self._all):
            self._close(conn)
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    def configuration(self, is_client: bool) -> QuicConfiguration:
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

    def register_tunnel(self, kind: StreamKind, handler: TunnelHandler, passive_ok: bool = False) -> None:
        """Route incoming streams of a tunnel kind to a handler (HTTP and RPC tunnels); only members
        may open them unless ``passive_ok`` (clients and standbys may too)."""
        self.control.tunnel_handlers[kind] = (handler, passive_ok)

    def publish_gossip(self, gossip: Gossip) -> None:
        self.published.gossip = gossip

    def publish_routes(self, snapshot: RouteSnapshot, frame: bytes) -> None:
        """The router's snapshot, and the frame route requests are answered with (its table, packed
        once, by the transport actor); a new version of both."""
        self.published.route_table = snapshot.table
        self.published.route_frame = frame
        self.published.route_snapshot = snapshot
        self.published.route_version += 1

    def route_now(self, model: str) -> RouteReply | None:
        """The Router's answer for ``model``, from the snapshot it published last (no thread hop: the
        gateway and the tunnels call this for every request). None where no Router publishes one
        (a passive node: ask its router) or while none runs."""
        snapshot = self._route_snapshot()
        return route_reply(snapshot, model) if snapshot is not None else None

    def models_now(self) -> ModelList | None:
        """The Router's answer to ListModels from the same snapshot (so a model the gateway lists is
        one it routes); None as for :meth:`route_now`."""
        snapshot = self._route_snapshot()
        return model_list(snapshot.table) if snapshot is not None else None

    def _route_snapshot(self) -> RouteSnapshot | None:
        snapshot = self.published.route_snapshot
        router = self.directory.ref("router")
        if snapshot is None or router is None or not router.is_alive():
            return None
        return snapshot

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
        conn.wake_readers()
        if conn.datagram_transport is not None:
            conn.datagram_transport.close()

    def drop(self, conn: MeshConnection) -> None:
        """Close a connection and stop counting it."""
        self._all.discard(conn)
        self._close(conn)

    def track(self, conn: MeshConnection) -> None:
        """Count a connection as ours (inbound ones from their first stream). A stream that came in
        the same datagram as the peer's close is served after the connection ended: not counted."""
        if not conn.terminated:
            self._all.add(conn)

    def adopt(self, conn: MeshConnection) -> None:
        """Make an authenticated connection the one we use for its (active) peer."""
        assert conn.peer_id is not None
        if not conn.passive:
            self.peers[conn.peer_id] = conn
            self.revocations.on_member(conn)

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
        if existing is not None and existing.usable:
            return existing
        reason = self.gate.revoked_reason(node_id, "")
        if reason:
            raise AuthError(reason)
        pending = self._connecting.get(node_id)
        if pending is not None:
            return await asyncio.wait_for(asyncio.shield(pending), timeout)
        future: asyncio.Future[MeshConnection] = self.loop.create_future()
        self._connecting[node_id] = future
        try:
            conn = await asyncio.wait_for(dial(self, node_id, addrs, timeout), timeout)
            future.set_result(conn)
            return conn
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            future.exception()  # mark retrieved
            raise
        finally:
            self._connecting.pop(node_id, None)

    # -- sending ------------------------------------------------------------------------------------------

    def count_out(self, kind: StreamKind, data: bytes, frames: int) -> None:
        self.counters.bytes_sent[kind.name] += len(data)
        self.counters.frames_sent[kind.name] += frames

    async def _open(
        self, conn: MeshConnection, kind: StreamKind, *msgs: Message
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await conn.create_stream()
        data = pack_stream_start(kind, *msgs)
        self.count_out(kind, data, len(msgs))
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
                    hello = self.gate.hello(self.role, node_id)
                    reader, writer = await self._open(conn, kind, hello, body)
                    writer.write_eof()
                    answer = await read_frame_as(reader, Hello)
                    self.gate.check_answer(answer, hello, node_id)
                    conn.peer_role = answer.role
                    conn.mark_authenticated()
                    reply = await read_frame_as(reader, reply_type)
                    self.adopt(conn)
                    return reply
        reader, writer = await self._open(conn, kind, body)
        writer.write_eof()
        reply = await read_frame_as(reader, reply_type)
        self.adopt(conn)
        return reply

    async def _exchange_gossip(self, node_id: str, addrs: tuple[str, ...], gossip: Gossip) -> None:
        reply = await self._control_exchange(node_id, addrs, StreamKind.GOSSIP, gossip, Gossip)
        self.directory.tell("registry", GossipReceived(peer_id=node_id, announcements=reply.announcements))

    async def _exchange_routes(
        self, node_id: str, addrs: tuple[str, ...], request: RouteRequest | None = None
    ) -> None:
        reply = await self._control_exchange(
            node_id, addrs, StreamKind.ROUTE_REQUEST, request or RouteRequest(), RouteTable
        )
        self.directory.tell("router", RoutesReceived(source=node_id, table=reply))

    async def _authenticate(self, node_id: str, addrs: tuple[str, ...]) -> None:
        """Meet a node: active nodes gossip, passive ones ask for routes (and are never registered)."""
        if self.role == "active":
            await self._exchange_gossip(node_id, addrs, self.published.gossip)
        else:
            await self._exchange_routes(node_id, addrs)

    async def refresh_routes(
        self,
        actives: tuple[Seed, ...],
        timeout: float,
        every: bool = False,
        request: RouteRequest | None = None,
    ) -> None:
        """Passive side: ask the first active node that answers for the routing table; with ``every``,
        ask all of them at once (each answer is told to the router), which keeps a connection to each,
        so their death and leaving notices reach this node."""
        if every and len(actives) > 1:
            results = await asyncio.gather(
                *(self._routes_from(seed, timeout, request) for seed in actives), return_exceptions=False
            )
            errors = [e for e in results if e]
            if len(errors) == len(actives):
                self.directory.tell("router", RoutesFailed(reason="; ".join(errors)))
            return
        errors = []
        for seed in random.sample(list(actives), len(actives)):
            error = await self._routes_from(seed, timeout, request)
            if not error:
                return
            errors.append(error)
        self.directory.tell("router", RoutesFailed(reason="; ".join(errors) or "no active node known"))

    async def _routes_from(self, seed: Seed, timeout: float, request: RouteRequest | None) -> str:
        """One route request; "" when the table came (and was told to the router), else why not."""
        try:
            await asyncio.wait_for(self._exchange_routes(seed.node_id, seed.addrs, request), timeout)
            return ""
        except (PeerRefused, AuthError) as exc:
            reason = exc.reason if isinstance(exc, PeerRefused) else str(exc)
            self.log.warning("auth.refused", peer=seed.node_id, reason=reason, side="dialler")
            return f"{seed.node_id[:12]}: refused: {reason}"
        except (OSError, ConnectionError, TimeoutError, CodecError) as exc:
            return f"{seed.node_id[:12]}: {type(exc).__name__}: {exc}".rstrip(": ")
        except Exception as exc:  # the router must hear back whatever went wrong, or it waits 30 s
            self.log.warning("routes.request_error", peer=seed.node_id, error=f"{type(exc).__name__}: {exc}")
            return f"{seed.node_id[:12]}: {type(exc).__name__}: {exc}"

    async def open_tunnel(
        self, node_id: str, addrs: tuple[str, ...], kind: StreamKind, header: Message, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a tunnel stream to a node (connecting and authenticating first if needed) and send its
        header frame; the caller then moves raw bytes."""
        conn = self.peers.get(node_id)
        if conn is None or not conn.usable:
            await asyncio.wait_for(self._authenticate(node_id, addrs), timeout)
            conn = self.peers[node_id]
        return await self._open(conn, kind, header)

    async def ping_peer(self, node_id: str, timeout: float) -> None:
        """A QUIC-level ping on our connection to a node; raises if there is none or no answer."""
        conn = self.peers.get(node_id)
        if conn is None or not conn.usable:
            raise ConnectionError(f"no connection to {node_id[:12]}")
        await asyncio.wait_for(conn.ping(), timeout)

    async def probe(self, node_id: str, addrs: tuple[str, ...], timeout: float) -> None:
        """Ping a peer at the QUIC level (re-dialling with a gossip exchange if we hold no connection)."""
        started = time.monotonic()
        self.counters.probes_sent += 1
        try:
            conn = self.peers.get(node_id)
            if conn is None or not conn.usable:
                await asyncio.wait_for(self._exchange_gossip(node_id, addrs, self.published.gossip), timeout)
            else:
                await asyncio.wait_for(conn.ping(), timeout)
            result = ProbeResult(node_id=node_id, ok=True, rtt_ms=(time.monotonic() - started) * 1000)
        except (TimeoutError, OSError, ConnectionError, CodecError, PeerRefused, AuthError) as exc:
            result = ProbeResult(node_id=node_id, ok=False, rtt_ms=0.0, error=f"{type(exc).__name__}: {exc}")
        self.directory.tell("heartbeat", result)

    def _routes_without(self, node_id: str, served: tuple[str, ...] = ()) -> RouteTable | None:
        """The table passive connections get with a notice about ``node_id``, the models it ``served``
        kept without a host (an active node's only: a passive node publishes none)."""
        if self.role != "active":
            return None
        return without_dead_host(self.published.route_table, node_id, served)

    async def broadcast_peer_down(
        self, notice: PeerDown, members: bool = True, served: tuple[str, ...] = ()
    ) -> None:
        """Push a death notice down every authenticated connection (only the passive ones unless
        ``members``), passive ones with our routing table without the dead node (``served``: the
        models it announced serving, listed without a host), then drop the dead node's connections."""
        self.forget(notice.node_id)
        routes = self._routes_without(notice.node_id, served)
        targets = [c for c in self._all if members or c.passive]
        await send_notices(targets, StreamKind.PEER_DOWN, notice, routes, self.count_out)

    async def leave(self, notice: PeerLeaving, timeout: float) -> None:
        """Tell everyone we are leaving (passive connections with our table without us), wait
        (bounded) for their acks, and close every connection."""
        routes = self._routes_without(self.node_id)
        await finish_introductions(self._all, timeout / 2)
        await send_notices(list(self._all), StreamKind.PEER_LEAVING, notice, routes, self.count_out, timeout)
        for conn in list(self._all):
            self._close(conn)

    def stats(self) -> TransportStats:
        auth = [c for c in self._all if c.authenticated.is_set() and not c.terminated]
        return TransportStats(
            connections=len(auth),
            passive_connections=sum(1 for c in auth if c.passive),
            standby_connections=sum(1 for c in auth if c.peer_role == "standby"),
            bytes_sent=dict(self.counters.bytes_sent),
            frames_sent=dict(self.counters.frames_sent),
            frames_received=dict(self.counters.frames_received),
            probes_sent=self.counters.probes_sent,
        )
