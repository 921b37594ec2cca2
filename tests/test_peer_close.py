"""A connection the peer closed is given up when its close arrives.

aioquic keeps such a connection draining for three probe timeouts before it reports the end, and
answers nothing on it meanwhile. On a loaded path that is seconds: a node went on pinging a peer that
had closed on it, heard nothing, and declared a live peer dead (ten nodes starting in one process
buried one another that way, one false death feeding the next).
"""

from __future__ import annotations

from meshllm.config import TimingSection
from meshllm.net.connection import MeshConnection
from meshllm.wire.invite import InviteToken
from tests.support import NodeFactory, wait_until

QUIET = TimingSection(gossip_interval_s=60.0, probe_interval_s=60.0, dead_after_s=120.0)
"""No gossip round or probe of their own in the test's time: only the test dials."""
SLOW_PATH_PTO_S = 20.0
"""The probe timeout of a loaded path, stretched: aioquic would drain the closed connection 60 s."""


def test_a_connection_the_peer_closed_is_given_up_at_once(nodes: NodeFactory) -> None:
    a = nodes.start("a", timing=QUIET)
    b = nodes.start("b", join=(a.invite_token,), timing=QUIET)
    wait_until(lambda: a.peer_ids() == {b.node_id} and b.peer_ids() == {a.node_id}, 10, what="a and b")
    assert a.endpoint is not None and b.endpoint is not None
    conn: MeshConnection = wait_until(lambda: a.endpoint.peers.get(b.node_id), 10, what="a's connection")
    conn._quic._loss.get_probe_timeout = lambda *_, **__: SLOW_PATH_PTO_S  # type: ignore[method-assign]

    b.endpoint.loop.call_soon_threadsafe(b.endpoint.forget, a.node_id)  # b closes every connection to a
    nodes.logs["a"].wait_for("connection.lost", timeout=5, peer=b.node_id)
    assert not conn.usable and a.endpoint.peers.get(b.node_id) is not conn

    # The next probe dials a new connection instead of pinging the closed one.
    addrs = InviteToken.decode(b.invite_token).addrs
    a.endpoint.loop_thread.run(a.endpoint.probe(b.node_id, addrs, timeout=5), timeout=10)
    fresh = a.endpoint.peers.get(b.node_id)
    assert fresh is not None and fresh is not conn and fresh.usable
    a.endpoint.loop_thread.run(a.endpoint.ping_peer(b.node_id, timeout=5), timeout=10)
