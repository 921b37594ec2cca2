"""Issue #12 end to end: a mesh member forges another node's announcement over real loopback QUIC.

The attacker is an admitted active node: it holds the mesh secret and its own key, so the transport
lets its gossip in. What it cannot do is sign for another node, so the record it forges - the
victim's, pushed to a huge version and serving a model nobody has - is refused by the node it is sent
to, and logged there once, while the victim's real updates keep reaching that node.
"""

from __future__ import annotations

from dataclasses import replace

from meshllm.node import Node
from meshllm.wire.announcement import sign_announcement
from meshllm.wire.messages import (
    ExchangeGossip,
    GetRouteTable,
    Gossip,
    PeerAnnouncement,
    RouteTable,
    SetDemand,
)
from tests.support import NodeFactory, wait_until


def forged_record_of(victim: Node) -> PeerAnnouncement:
    """The victim's announcement as a hostile relayer would rewrite it: a version far ahead, a fake
    model served and wanted, the victim's key and a genuine signature of the victim's (over an
    earlier record, as seen in gossip)."""
    assert victim.identity is not None
    genuine = sign_announcement(
        PeerAnnouncement(
            node_id=victim.node_id,
            name=victim.config.node.name,
            role="active",
            addrs=victim.addrs,
            vram_bytes=0,
            incarnation=victim.incarnation,
        ),
        victim.identity,
    )
    return replace(
        genuine,
        version=10**12,
        models=("fake-model",),
        serving=("fake-model",),
        demand={"fake-model": 1000.0},
    )


def table(node: Node) -> RouteTable:
    return node.directory.ask("router", GetRouteTable(), RouteTable)


def test_a_members_forged_announcement_is_refused_and_the_victims_updates_still_arrive(
    nodes: NodeFactory,
) -> None:
    observer = nodes.start("observer")
    victim = nodes.start("victim", join=(observer.invite_token,))
    attacker = nodes.start("attacker", join=(observer.invite_token,))
    everyone = {observer.node_id, victim.node_id, attacker.node_id}
    wait_until(
        lambda: all(n.peer_ids() == everyone - {n.node_id} for n in (observer, victim, attacker)),
        timeout=20,
        what="the three nodes to converge",
    )
    forged = forged_record_of(victim)

    def attack() -> None:
        """The attacker's transport sends the observer gossip carrying the forged record."""
        attacker.directory.tell(
            "transport",
            ExchangeGossip(
                node_id=observer.node_id, addrs=observer.addrs, gossip=Gossip(announcements=(forged,))
            ),
        )

    attack()
    refused = nodes.logs["observer"].wait_for(
        "gossip.refused", timeout=10, sender=attacker.node_id, peer=victim.node_id
    )
    assert refused["reason"] == "bad signature" and refused["version"] == 10**12

    # The victim's real next versions still reach the observer while the attack goes on.
    for count in (7.0, 9.0):
        victim.directory.tell("registry", SetDemand(demand={"real-model": count}))

        def arrived(count: float = count) -> bool:
            attack()
            return table(observer).demand.get("real-model") == count

        wait_until(arrived, timeout=15, what=f"the victim's demand of {count} to reach the observer")

    routes = table(observer)
    assert "fake-model" not in {m.name for m in routes.models} | set(routes.unserved) | set(routes.demand)
    [peer] = [p for p in observer.status().peers if p.node_id == victim.node_id]
    assert peer.serving == () and peer.models == ()
    # Sent many times, logged once.
    assert len(nodes.logs["observer"].find("gossip.refused", sender=attacker.node_id)) == 1
