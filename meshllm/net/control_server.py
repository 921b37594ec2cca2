"""The listening side of a node's QUIC endpoint: every stream another node opens starts here.

The first byte names the stream's kind. Tunnel kinds go to the handler registered for them (HTTP and
RPC tunnels), once the connection is authenticated. Control kinds carry msgpack frames and are
answered here, under a deadline:

- admission: a Hello (grant + node key signature, :class:`~meshllm.wire.gate.Gate`) may open a
  connection, only on a gossip or route request stream; the connection may do what the grant allows,
  whatever the Hello asks; a route request makes the connection passive (never registered, never
  gossiped);
- gossip, death notices, revocations and RPC tunnels: from members (active capability) only; gossip
  is answered with the registry's published view;
- route request: answered with the router's published table (encoded once per change);
- peer down / peer leaving notices: told to the actor that owns liveness on this node, and acked;
  on a passive node with the routing table the active node pushed after the notice, if it did
  (:mod:`meshllm.net.notices`);
- revocations: checked against the mesh's authority key, applied and passed on by the endpoint.

Anything else is refused with a typed reason, logged, and never kills the node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from meshllm.net import misbehaviour
from meshllm.net.connection import MeshConnection
from meshllm.net.notices import read_pushed_routes
from meshllm.net.preauth import MAX_HELLO_BYTES
from meshllm.wire.admission import AuthError
from meshllm.wire.codec import MAX_MESSAGE_BYTES, CodecError, Message
from meshllm.wire.framing import FrameError, StreamKind, StreamStalled, pack_frame, parse_kind, read_frame
from meshllm.wire.messages import (
    Ack,
    AskedFor,
    Claim,
    ClaimSeen,
    Gossip,
    GossipReceived,
    Hello,
    PeerDown,
    PeerDownReceived,
    PeerLeaving,
    PeerLeavingReceived,
    Refused,
    RevocationList,
    RouteRequest,
)

if TYPE_CHECKING:
    from meshllm.net.endpoint import MeshEndpoint

CONTROL_TIMEOUT_S = 10.0
ROUTE_REQUEST_TIMEOUT_S = 3.0
"""A passive node's route request: a live active node answers in milliseconds; one that does not
answer in this time is likely dead, and the next one is asked (a client whose only contact died must
not wait the whole control timeout before it learns the new host)."""
TunnelHandler = Callable[[MeshConnection, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
REFUSED_LINGER_S = 0.5
"""An unauthenticated connection refused for garbage is closed this long after its Refused frame."""
HELLO_KINDS = (StreamKind.GOSSIP, StreamKind.ROUTE_REQUEST)
"""The only streams that may open a connection with a Hello."""


class ControlServer:
    """Serves the streams other nodes open on this node's QUIC connections."""

    def __init__(self, endpoint: MeshEndpoint) -> None:
        self.endpoint = endpoint
        self.tunnel_handlers: dict[StreamKind, tuple[TunnelHandler, bool]] = {}  # handler, passive_ok
        self.timeout_s = CONTROL_TIMEOUT_S  # a control stream that stalls longer is closed

    async def serve_stream(
        self, conn: MeshConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Handle one stream the other side opened."""
        ep = self.endpoint
        ep.track(conn)
        kind: StreamKind | None = None
        try:
            kind = await self._kind(reader)
            entry = self.tunnel_handlers.get(kind)
            if entry is not None:
                handler, passive_ok = entry
                await self._await_auth(conn)
                if not passive_ok:
                    self._members_only(conn, f"{kind.name} streams")
                await handler(conn, reader, writer)
                return
            await asyncio.wait_for(self._serve_control(conn, kind, reader, writer), self.timeout_s)
        except AuthError as exc:
            fields = {"peer": conn.peer_id, "reason": str(exc), "side": "listener"}
            if conn.preauth_pending:  # counted, throttled; the deadline closes the connection
                conn.note_preauth("bad_hello", event="auth.refused", **fields)
            else:
                ep.log.warning("auth.refused", **fields)
            writer.write(pack_frame(Refused(reason=str(exc))))
        except (CodecError, TimeoutError) as exc:
            reason = "stalled" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            kind_name = kind.name if kind else None
            if conn.preauth_pending:  # no Hello yet and already garbage: closed (after the Refused)
                fields = {"peer": None, "kind": kind_name, "reason": reason}
                conn.refuse_preauth("garbage", REFUSED_LINGER_S, event="stream.rejected", **fields)
            else:
                self._misbehaved(conn, reader, exc, reason, kind_name)
            with contextlib.suppress(Exception):
                writer.write(pack_frame(Refused(reason=reason)))
        except (ConnectionError, OSError) as exc:
            ep.log.info("stream.broken", peer=conn.peer_id, reason=str(exc))
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    @staticmethod
    async def _kind(reader: asyncio.StreamReader) -> StreamKind:
        """The stream's kind byte, within :data:`~meshllm.net.misbehaviour.STREAM_HEAD_TIMEOUT_S`."""
        try:
            byte = await asyncio.wait_for(reader.read(1), misbehaviour.STREAM_HEAD_TIMEOUT_S)
        except TimeoutError:
            raise StreamStalled(f"no kind byte within {misbehaviour.STREAM_HEAD_TIMEOUT_S:g} s") from None
        return parse_kind(byte)

    def _misbehaved(
        self,
        conn: MeshConnection,
        reader: asyncio.StreamReader,
        exc: CodecError | TimeoutError,
        reason: str,
        kind: str | None,
    ) -> None:
        """A stream of an admitted peer broke the protocol: drop the peer, or count a strike
        (:mod:`meshllm.net.misbehaviour`); a stream cut by a reset or a closing connection is neither."""
        ep = self.endpoint
        if conn.closing or conn.was_reset(reader):
            ep.log.info("stream.broken", peer=conn.peer_id, kind=kind, reason=reason)
            return
        if isinstance(exc, TimeoutError):
            why: str | None = f"StreamStalled: no complete request within {self.timeout_s:g} s"
        else:
            why = misbehaviour.drop_reason(exc)
        if why is None:
            ep.log.warning("stream.rejected", peer=conn.peer_id, kind=kind, reason=reason)
            conn.strike(reason, REFUSED_LINGER_S, kind=kind)
        else:
            conn.drop_peer(why, REFUSED_LINGER_S, kind=kind)

    def _answer(
        self, writer: asyncio.StreamWriter, kind: StreamKind, hello: Hello | None, reply: Message | bytes
    ) -> None:
        """The reply to a control request (a message, or a frame already packed), preceded by our
        Hello when theirs opened the connection."""
        frames = [] if hello is None else [pack_frame(hello)]
        frames.append(reply if isinstance(reply, bytes) else pack_frame(reply))
        data = b"".join(frames)
        self.endpoint.count_out(kind, data, len(frames))
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

    @staticmethod
    def _members_only(conn: MeshConnection, what: str) -> None:
        """Refuse a peer whose connection does not have the active capability (its grant's, never
        what it says it is)."""
        if conn.passive:
            raise AuthError(f"{what} are for members only: this connection is {conn.peer_role}")

    async def _admit(self, conn: MeshConnection, kind: StreamKind, hello: Hello) -> Hello:
        """Check a Hello that opens a connection; our own Hello goes back with the answer."""
        ep = self.endpoint
        if kind not in HELLO_KINDS:
            raise AuthError(f"Hello is not accepted on a {kind.name} stream")
        if conn.peer_id is not None and conn.peer_id != hello.node_id:
            raise AuthError("connection already belongs to another node")
        admitted = ep.gate.admit(hello)
        if kind == StreamKind.GOSSIP and admitted.role != "active":
            raise AuthError(f"gossip is for members only: a {admitted.role} may not gossip")
        conn.peer_id = hello.node_id
        conn.token_id = admitted.token_id
        if kind == StreamKind.ROUTE_REQUEST:  # a passive node; "client" or "standby" kept
            conn.peer_role = admitted.role if admitted.role in ("client", "standby") else "passive"
        else:
            conn.peer_role = admitted.role
        conn.mark_authenticated()
        return ep.gate.answer(hello, ep.role)

    async def _serve_control(
        self,
        conn: MeshConnection,
        kind: StreamKind,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        ep = self.endpoint
        # Before admission only a Hello may come, and a Hello is small: a longer frame is refused
        # before any of it is buffered.
        unproven = not conn.outbound and not conn.authenticated.is_set()
        first = await read_frame(reader, MAX_HELLO_BYTES if unproven else MAX_MESSAGE_BYTES)
        ep.counters.frames_received[kind.name] += 1
        reply_hello: Hello | None = None
        if isinstance(first, Hello):
            reply_hello = await self._admit(conn, kind, first)
            body = await read_frame(reader)
        else:
            await self._await_auth(conn)
            body = first
        peer = conn.peer_id
        assert peer is not None
        if kind == StreamKind.GOSSIP:
            if not isinstance(body, Gossip):
                raise FrameError(f"expected Gossip, got {type(body).__name__}")
            if conn.passive or ep.role != "active":
                raise AuthError("passive nodes do not gossip")
            ep.adopt(conn)
            ep.directory.tell("registry", GossipReceived(peer_id=peer, announcements=body.announcements))
            self._answer(writer, kind, reply_hello, ep.published.gossip)
        elif kind == StreamKind.ROUTE_REQUEST:
            if not isinstance(body, RouteRequest):
                raise FrameError(f"expected RouteRequest, got {type(body).__name__}")
            if ep.role != "active":
                raise AuthError("this node is passive: ask an active node for routes")
            if body.asked:
                ep.directory.tell("router", AskedFor(asked=body.asked))
            if body.claim:
                claim = Claim(model=body.claim, node_id=peer, key=body.claim_key)
                ep.directory.tell("router", ClaimSeen(claim=claim))
            self._answer(writer, kind, reply_hello, ep.published.route_frame)
        elif kind == StreamKind.PEER_DOWN:
            if not isinstance(body, PeerDown):
                raise FrameError(f"expected PeerDown, got {type(body).__name__}")
            if ep.role == "active":
                self._members_only(conn, "death notices")
            routes = None if ep.role == "active" else await read_pushed_routes(reader)
            ep.directory.tell(ep.notice_target, PeerDownReceived(notice=body, from_peer=peer, routes=routes))
            if ep.role != "active":
                ep.forget(body.node_id)  # a passive node has no heartbeat: the notice is its signal
            writer.write(pack_frame(Ack()))
        elif kind == StreamKind.PEER_LEAVING:
            if not isinstance(body, PeerLeaving):
                raise FrameError(f"expected PeerLeaving, got {type(body).__name__}")
            if body.node_id != peer:
                raise AuthError("a node can only announce its own leaving")
            routes = None if ep.role == "active" else await read_pushed_routes(reader)
            ep.directory.tell(ep.notice_target, PeerLeavingReceived(notice=body, routes=routes))
            writer.write(pack_frame(Ack()))
        elif kind == StreamKind.REVOCATION:
            if not isinstance(body, RevocationList):
                raise FrameError(f"expected RevocationList, got {type(body).__name__}")
            self._members_only(conn, "revocations")
            ep.revocations.apply(body.revocations, source=peer)
            writer.write(pack_frame(Ack()))
        else:
            raise FrameError(f"{kind.name} streams are not served by this node")
