"""The mesh core in one process over real loopback QUIC: joining, convergence, leaving, death,
admission and resistance to garbage."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import threading
import time

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

from meshllm.net import endpoint as endpoint_module
from meshllm.net.endpoint import ALPN, MeshEndpoint
from meshllm.wire.codec import M, Message
from meshllm.wire.framing import FrameBuffer, StreamKind, pack_stream_start
from meshllm.wire.invite import InviteToken, MeshMembership
from meshllm.wire.messages import Gossip, Hello, PeerDown, PeerDownReceived, Refused
from tests.support import NodeFactory, wait_until


@pytest.mark.serial
def test_ten_nodes_join_through_one_bootstrap(nodes: NodeFactory) -> None:
    boot = nodes.start("n0")
    others = [nodes.start(f"n{i}", join=(boot.invite_token,)) for i in range(1, 10)]
    everyone = [boot, *others]
    ids = {n.node_id for n in everyone}
    wait_until(
        lambda: all(n.peer_ids() == ids - {n.node_id} for n in everyone),
        timeout=20,
        what="10 nodes to converge",
    )


def test_leave_is_a_leave_not_a_death(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, timeout=10, what="b to join")
    b.stop(leave=True)
    # The event, not its speed: tests/bench/bench_mesh.py measures how soon it comes.
    record = nodes.logs["a"].wait_for("peer.left", timeout=10, peer=b.node_id)
    assert record["peer_name"] == "b"
    assert a.peer_ids() == set()
    assert not nodes.logs["a"].find("peer.died")


def test_a_death_a_node_decided_goes_to_its_members_and_one_it_heard_does_not(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that decides a peer is dead tells its members (``members``); one that heard of the death
    from another member tells only its passive connections, since the members have had it."""
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, timeout=10, what="b to join")
    ep_a, ep_b = a.endpoint, b.endpoint
    assert isinstance(ep_a, MeshEndpoint) and isinstance(ep_b, MeshEndpoint)
    heard: list[str] = []
    tell = ep_b.directory.tell

    def noting(name: str, message: Message) -> bool:
        if isinstance(message, PeerDownReceived):
            heard.append(message.notice.node_id)
        return tell(name, message)

    monkeypatch.setattr(ep_b.directory, "tell", noting)
    for dead, members in (("heard-of", False), ("decided", True)):
        notice = PeerDown(node_id=dead, incarnation=1, reporter=a.node_id)
        ep_a.loop_thread.run(ep_a.broadcast_peer_down(notice, members=members), timeout=10)
    wait_until(lambda: "decided" in heard, timeout=10, what="b to hear of the death a decided")
    # Had the first notice gone to b, it would have gone first, on the same connection.
    assert "heard-of" not in heard


def test_a_node_that_leaves_while_its_join_is_answered_leaves(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b leaves while a's answer to its first exchange is on its way. a has registered b already, so
    b waits for the answer and tells a it leaves; it used to close without a word (its connection
    was not authenticated yet), and a declared it dead."""
    a = nodes.start("a")
    answered = threading.Event()
    read_frame_as = endpoint_module.read_frame_as

    async def held(reader: asyncio.StreamReader, cls: type[M]) -> M:
        if cls is Hello:
            await asyncio.to_thread(answered.wait, 10)
        return await read_frame_as(reader, cls)

    monkeypatch.setattr(endpoint_module, "read_frame_as", held)
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, timeout=10, what="a to register b")
    threading.Timer(0.2, answered.set).start()  # the answer comes while b leaves
    b.stop(leave=True)
    nodes.logs["a"].wait_for("peer.left", timeout=10, peer=b.node_id)
    assert not nodes.logs["a"].find("peer.died")


def test_silent_node_is_declared_dead_and_can_come_back(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    c = nodes.start("c", join=(a.invite_token,))
    wait_until(lambda: len(a.peer_ids()) == 2 and len(b.peer_ids()) == 2, timeout=10, what="convergence")
    c_id = c.node_id
    c.stop(leave=False)  # vanishes without a word, like kill -9 as far as peers can tell
    for name in ("a", "b"):
        nodes.logs[name].wait_for("peer.died", timeout=20, peer=c_id)
    wait_until(lambda: c_id not in a.peer_ids() and c_id not in b.peer_ids(), timeout=10, what="c dropped")
    # Stale gossip does not bring it back; a restart from the same data dir does.
    c2 = nodes.start("c", join=(a.invite_token,))
    assert c2.node_id == c_id
    wait_until(lambda: c_id in a.peer_ids() and c_id in b.peer_ids(), timeout=10, what="c to be back")


def test_forged_token_is_refused_and_registered_nowhere(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    real = InviteToken.decode(a.invite_token)
    # The right mesh id, but a grant signed by an authority key of the forger's own making.
    forger = MeshMembership.with_secret(real.mesh_id, b"x" * 32)
    forged = forger.invite(real.node_id, real.addrs, "active", time.time())
    intruder = nodes.start("intruder", join=(forged.encode(),))
    refused = nodes.logs["a"].wait_for("auth.refused", timeout=10)
    assert refused["reason"] == "grant not signed by this mesh's authority"
    nodes.logs["intruder"].wait_for(
        "mesh.join_failed", timeout=10, reason="grant not signed by this mesh's authority"
    )
    assert a.peer_ids() == set()
    assert intruder.peer_ids() == set()
    # Another mesh's token entirely: refused for the mesh id.
    other = MeshMembership.found().invite(real.node_id, real.addrs, "active", time.time())
    nodes.start("stranger", join=(other.encode(),))
    nodes.logs["a"].wait_for(
        "auth.refused", timeout=10, reason=f"wrong mesh: {other.mesh_id!r} is not this node's mesh"
    )
    assert a.peer_ids() == set()


def test_token_with_wrong_node_id_is_refused_by_certificate(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    real = InviteToken.decode(a.invite_token)
    lying = dataclasses.replace(real, node_id="0" * 32)
    liar = nodes.start("b", join=(lying.encode(),))
    record = nodes.logs["b"].wait_for("auth.refused", timeout=10)
    assert "certificate" in record["reason"]
    assert liar.peer_ids() == set() and a.peer_ids() == set()


async def _raw_stream(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    async with connect("127.0.0.1", port, configuration=config) as conn:
        reader, writer = await conn.create_stream()
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\x00garbage", "unknown stream kind 255"),
        (bytes([StreamKind.GOSSIP]) + b"\x00\x00\x00\x05notmsgpack", "not msgpack"),
        (bytes([StreamKind.GOSSIP]) + b"\xff\xff\xff\xff", "over cap"),  # a length far over the cap
        (pack_stream_start(StreamKind.GOSSIP, Gossip(announcements=())), "must carry a Hello"),
        (pack_stream_start(StreamKind.PEER_DOWN, Refused(reason="x")), "must carry a Hello"),
    ],
    ids=["bad-kind", "bad-frame", "oversized", "no-hello", "unauthenticated"],
)
def test_garbage_stream_is_closed_and_node_keeps_serving(
    nodes: NodeFactory, payload: bytes, reason: str
) -> None:
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, timeout=10, what="b to join")
    answer = asyncio.run(_raw_stream(a.quic_port, payload))
    # One Refused frame that says why, then the end of the stream (the read returned).
    frames = FrameBuffer().feed(answer)
    assert len(frames) == 1 and isinstance(frames[0], Refused), frames
    assert reason in frames[0].reason
    # The node is unaffected: a newcomer still joins and the old peer is still there.
    c = nodes.start("c", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id, c.node_id}, timeout=10, what="c to join after garbage")
    assert a.status().node_id == a.node_id


def test_status_lists_peers_with_contract_fields(nodes: NodeFactory) -> None:
    import json
    import urllib.request

    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,), vram_gb=3.0)
    wait_until(lambda: a.peer_ids() == {b.node_id}, timeout=10, what="b to join")
    body = json.loads(urllib.request.urlopen(a.console_url + "/api/status", timeout=5).read())
    for key in ("node_id", "name", "role", "vram_bytes", "peers"):
        assert key in body
    (peer,) = body["peers"]
    assert peer["node_id"] == b.node_id and peer["name"] == "b" and peer["role"] == "active"
    assert peer["vram_bytes"] == 3 * 1024**3
    for key in ("models", "serving", "last_seen_s"):
        assert key in peer
