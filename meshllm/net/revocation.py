"""Revocations on a running node: applying them, cutting off what they name, spreading them, and the
local socket ``meshllm revoke`` talks to.

Why a flood and not gossip: a revocation must reach every member at once, not within a few gossip
rounds, and it is tiny. A node passes on only revocations that were new to it, so each crosses each
link about once; a member that was away gets the whole list when a connection to it is first used
(:meth:`Revocations.on_member`). Every revocation is checked against the mesh's authority key
(:class:`~meshllm.wire.gate.Gate`), whoever relayed it.

The local channel is a Unix socket in the data dir (``node.sock``, mode 0600): only the user who
can read the node's files can use it, with no port, key or token to manage. One request frame
(:class:`RevokeRequest`), one answer (the revocations applied, or Refused with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from meshllm.wire.admission import AuthError
from meshllm.wire.codec import CodecError, Message
from meshllm.wire.framing import PeerRefused, StreamKind, pack_frame, read_frame_as
from meshllm.wire.messages import (
    Ack,
    ConnectionLost,
    Refused,
    Revocation,
    RevocationList,
    RevokeRequest,
)

if TYPE_CHECKING:
    from meshllm.net.connection import MeshConnection
    from meshllm.net.endpoint import MeshEndpoint

SOCKET_FILE = "node.sock"
SEND_TIMEOUT_S = 10.0


class Revocations:
    """The endpoint's side of revocation; lives on its loop."""

    def __init__(self, endpoint: MeshEndpoint) -> None:
        self.endpoint = endpoint
        self._server: asyncio.base_events.Server | None = None
        self._socket: Path | None = None

    def apply(self, revocations: tuple[Revocation, ...], source: str = "") -> tuple[Revocation, ...]:
        """Keep the valid new revocations, cut off what they name, pass them on to every member
        connection; returns what was new."""
        ep = self.endpoint
        new, refused = ep.gate.apply(revocations)
        for reason in refused:
            ep.log.warning("auth.revocation_refused", peer=source or None, reason=reason)
        for rev in new:
            self._cut(rev)
            ep.log.info("mesh.revoked", target=rev.target, source=source or None)
        if new:
            for conn in list(ep._all):
                live = conn.authenticated.is_set() and not conn.terminated
                if live and not conn.passive and conn.peer_id != source:
                    ep.spawn(self._send(conn, new))
        return new

    def _cut(self, rev: Revocation) -> None:
        """Close every connection of a node the revocation names (or that was admitted with it)."""
        ep = self.endpoint
        cut = ep.gate.nodes_of(rev.target)
        for conn in list(ep._all):
            if conn.peer_id not in cut and not (conn.token_id and conn.token_id == rev.target):
                continue
            peer = conn.peer_id
            ep.log.warning("auth.revoked", peer=peer, target=rev.target, reason="connection closed: revoked")
            was_peer = peer is not None and ep.peers.get(peer) is conn
            ep.drop(conn)
            if was_peer and peer is not None:
                del ep.peers[peer]
                lost = ConnectionLost(node_id=peer, reason="revoked")
                ep.directory.tell("registry", lost)
                ep.directory.tell("heartbeat", lost)

    def revoke(self, target: str) -> tuple[Revocation, ...]:
        """Sign a revocation of a node id or token id here (AuthError without the mesh secret),
        apply and spread it."""
        if not target:
            raise AuthError("nothing to revoke: give a node id or a token id")
        if target == self.endpoint.node_id:
            raise AuthError("a node cannot revoke itself: run meshllm revoke on another member")
        return self.apply((self.endpoint.gate.sign(target),))

    def on_member(self, conn: MeshConnection) -> None:
        """A member connection in use: once per connection, send it every revocation we hold."""
        if conn.revocations_sent:
            return
        conn.revocations_sent = True
        held = self.endpoint.gate.revocations()
        if held:
            self.endpoint.spawn(self._send(conn, held))

    async def _send(self, conn: MeshConnection, revocations: tuple[Revocation, ...]) -> None:
        ep = self.endpoint
        try:
            reader, writer = await ep._open(conn, StreamKind.REVOCATION, RevocationList(revocations))
            writer.write_eof()
            await asyncio.wait_for(read_frame_as(reader, Ack), SEND_TIMEOUT_S)
        except (OSError, ConnectionError, TimeoutError, CodecError, PeerRefused) as exc:
            ep.log.info("mesh.revocation_unsent", peer=conn.peer_id, reason=f"{type(exc).__name__}: {exc}")

    # -- the local socket -------------------------------------------------------------------------------

    async def listen(self, data_dir: Path) -> None:
        """Serve ``meshllm revoke`` on ``data_dir/node.sock`` (a warning if it cannot be bound)."""
        path = data_dir / SOCKET_FILE
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve_local, path=str(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
        except OSError as exc:
            self.endpoint.log.warning("control.unavailable", path=str(path), reason=str(exc))
            return
        self._socket = path

    async def _serve_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_frame_as(reader, RevokeRequest), SEND_TIMEOUT_S)
            try:
                new = self.revoke(request.target.strip())
            except AuthError as exc:
                writer.write(pack_frame(Refused(reason=str(exc))))
            else:
                writer.write(pack_frame(RevocationList(new)))
            await writer.drain()
        except (CodecError, TimeoutError, OSError, ConnectionError) as exc:
            self.endpoint.log.warning("control.rejected", reason=f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.unlink()
            self._socket = None


class RevokeError(Exception):
    """``meshllm revoke`` could not revoke; the text says why."""


def revoke_via_node(data_dir: Path, target: str, timeout: float = 15.0) -> str:
    """What ``meshllm revoke`` does: ask the node running on ``data_dir`` to sign and spread the
    revocation; when none runs there, sign it with the stored mesh secret and keep it in the data dir
    (the node spreads it when it starts). Returns a line for the user; RevokeError says why not."""
    import socket

    from meshllm.wire.framing import FrameBuffer
    from meshllm.wire.gate import Gate
    from meshllm.wire.identity import NodeIdentity
    from meshllm.wire.invite import InviteError, MeshMembership

    target = target.strip()
    if not target:
        raise RevokeError("nothing to revoke: give a node id or a token id")
    path = data_dir / SOCKET_FILE
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(pack_frame(RevokeRequest(target=target)))
            buffer, frames = FrameBuffer(), list[Message]()
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise RevokeError("the node closed the connection without an answer")
                frames = buffer.feed(data)
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # no node running there: sign it here
    except (OSError, CodecError) as exc:
        raise RevokeError(f"{path}: {exc}") from None
    else:
        answer = frames[0]
        if isinstance(answer, Refused):
            raise RevokeError(answer.reason)
        if not isinstance(answer, RevocationList):
            raise RevokeError(f"unexpected answer {type(answer).__name__}")
        return _summary(target, answer.revocations, "the node spreads it through the mesh now")
    try:
        membership = MeshMembership.load(data_dir)
    except InviteError as exc:
        raise RevokeError(str(exc)) from None
    if membership is None:
        raise RevokeError(f"{data_dir}: no mesh here (has this node ever started?)")
    gate = Gate(data_dir, membership, NodeIdentity.load_or_create(data_dir), None)
    try:
        new, _ = gate.apply((gate.sign(target),))
    except AuthError as exc:
        raise RevokeError(str(exc)) from None
    return _summary(target, new, "the node is not running: it spreads it when it starts")


def _summary(target: str, new: tuple[Revocation, ...], how: str) -> str:
    if not new:
        return f"{target} was already revoked"
    others = [r.target for r in new if r.target != target]
    extra = f" (and {len(others)} node(s) admitted with it: {', '.join(others)})" if others else ""
    return f"revoked {target}{extra}; {how}"
