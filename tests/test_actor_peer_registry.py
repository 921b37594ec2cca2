"""The PeerRegistry actor alone: fed gossip, notices and verdicts as msgpack messages, with dummy
"transport", "heartbeat" and subscriber ("router", "election") actors recording what it tells them.

Its gossip timer is set far in the future except in the one test about it; where time matters (dial
backoff, grave re-dials, the dead set's expiry) a fake clock is moved by hand and the ticks are sent
by the test.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

import actors.peer_registry as registry_module
from actors.peer_registry import DIAL_BACKOFF_S, GPU_MOVE_BYTES, GRAVE_REDIAL_S, PeerRegistry, gpus_moved
from meshllm.config import TimingSection
from meshllm.wire.announcement import announcement_payload, refusal
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    BroadcastPeerDown,
    ConnectionLost,
    DeathReported,
    DeclareDead,
    ExchangeGossip,
    GetStatus,
    Gossip,
    GossipFailed,
    GossipReceived,
    GossipSnapshot,
    GpuReport,
    JoinMesh,
    PeerAnnouncement,
    PeerDied,
    PeerDown,
    PeerDownReceived,
    PeerJoined,
    PeerLeaving,
    PeerLeavingReceived,
    PeerLeft,
    PeerStatus,
    PeerUpdated,
    Seed,
    SetDemand,
    SetLocalAnnouncement,
    StatusReply,
    Subscribe,
    Tick,
)
from tests.actor_dummies import FakeClock, Harness, Inbox
from tests.signing import identity, nid, signed

QUIET = TimingSection(gossip_interval_s=600.0, dead_ttl_s=60.0)
ME, A, B, C = nid("me"), nid("a"), nid("b"), nid("c")
OWN = signed(
    PeerAnnouncement(
        node_id=ME,
        name="me-name",
        role="active",
        addrs=("me.test:1",),
        vram_bytes=100,
        models=("m",),
        incarnation=7,
    )
)
SUBSCRIBERS = ("router", "election")


def ann(name: str, version: int = 0, incarnation: int = 1, **fields: Any) -> PeerAnnouncement:
    """The announcement of the test node called ``name``, signed by it."""
    base = PeerAnnouncement(
        node_id=nid(name),
        name=f"n-{name}",
        role="active",
        addrs=(f"{name}.test:1",),
        vram_bytes=10,
        incarnation=incarnation,
        version=version,
    )
    return signed(replace(base, **fields))


def start(h: Harness, timing: TimingSection = QUIET, subscribe: tuple[str, ...] = SUBSCRIBERS) -> None:
    for name in ("transport", "heartbeat", *subscribe):
        h.dummy(name)
    PeerRegistry.start(h.directory, h.logger, own=OWN, timing=timing, signer=identity("me"))
    for name in subscribe:
        h.tell("registry", Subscribe(subscriber=name))
    settle(h)


def settle(h: Harness) -> None:
    h.settle("registry", GetStatus())


def say(h: Harness, *msgs: Message) -> None:
    for msg in msgs:
        h.tell("registry", msg)
    settle(h)


def status(h: Harness) -> StatusReply:
    return h.ask("registry", GetStatus(), StatusReply)


def gossip(peer: PeerAnnouncement, *hearsay: PeerAnnouncement) -> GossipReceived:
    """A direct gossip exchange with ``peer``, which also tells us about ``hearsay``."""
    return GossipReceived(peer_id=peer.node_id, announcements=(peer, *hearsay))


def events(inbox: Inbox, since: int = 0) -> list[Message]:
    return inbox.messages(since=since)


def snapshot(transport: Inbox) -> tuple[PeerAnnouncement, ...]:
    return transport.last(GossipSnapshot).gossip.announcements


def exchanges(transport: Inbox, since: int = 0) -> list[str]:
    return [m.node_id for m in transport.messages(ExchangeGossip, since=since)]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock().install(monkeypatch, registry_module)


# -- joins and updates ----------------------------------------------------------------------------------------


def test_start_offers_its_own_announcement_to_the_transport(h: Harness) -> None:
    start(h)
    assert h.inboxes["transport"].messages() == [GossipSnapshot(gossip=Gossip(announcements=(OWN,)))]


def test_direct_gossip_from_a_new_peer_is_a_join(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    a, b = ann("a"), ann("b")
    say(h, gossip(a))
    for name in SUBSCRIBERS:
        assert events(h.inboxes[name]) == [PeerJoined(peer=a)]
    assert snapshot(transport) == (OWN, a)
    assert not exchanges(transport)  # nobody else to tell

    mark = transport.mark()
    say(h, gossip(b))
    assert events(h.inboxes["router"]) == [PeerJoined(peer=a), PeerJoined(peer=b)]
    assert snapshot(transport) == (OWN, a, b)
    # News of a newcomer is spread at once to the peers we already had.
    [spread] = transport.messages(ExchangeGossip, since=mark)
    assert spread.node_id == A and spread.addrs == a.addrs
    assert spread.gossip == Gossip(announcements=(OWN, a, b))
    assert [p.node_id for p in status(h).peers] == [A, B]


def test_a_newer_announcement_is_an_update_and_a_stale_one_is_ignored(h: Harness) -> None:
    start(h)
    router, transport = h.inboxes["router"], h.inboxes["transport"]
    say(h, gossip(ann("a", version=2)))

    newer = ann("a", version=3, serving=("m",))
    say(h, gossip(newer))
    assert events(router)[1:] == [PeerUpdated(peer=newer)]
    assert snapshot(transport) == (OWN, newer)

    mark, snapshots = router.mark(), transport.count(GossipSnapshot)
    say(h, gossip(ann("a", version=1)), gossip(ann("a", version=3)))  # older, then the same again
    assert events(router, since=mark) == []
    assert transport.count(GossipSnapshot) == snapshots
    assert status(h).peers[0].serving == ("m",)

    restarted = ann("a", version=0, incarnation=2)  # a restart, met directly: a newer life
    say(h, gossip(restarted))
    assert events(router, since=mark) == [PeerUpdated(peer=restarted)]


def test_hearsay_is_dialled_not_joined(h: Harness) -> None:
    start(h)
    transport, router = h.inboxes["transport"], h.inboxes["router"]
    a, c = ann("a"), ann("c")
    say(h, gossip(a, c, OWN, ann("client", role="client")))
    assert events(router) == [PeerJoined(peer=a)]  # only the node we talked to
    # c is met before it is trusted; a passive node is nobody's peer, and we are not our own.
    assert exchanges(transport) == [C]
    assert transport.last(ExchangeGossip).addrs == c.addrs
    assert [p.node_id for p in status(h).peers] == [A]


def test_hearsay_updates_a_known_peer_of_the_same_life(h: Harness) -> None:
    start(h)
    router, transport = h.inboxes["router"], h.inboxes["transport"]
    a, b = ann("a"), ann("b")
    say(h, gossip(a), gossip(b))
    mark = router.mark()
    b2 = ann("b", version=1, serving=("m",))
    say(h, gossip(a, b2))
    assert events(router, since=mark) == [PeerUpdated(peer=b2)]

    # A newer incarnation heard second hand is a restart to meet again, not an update.
    mark, dials = router.mark(), transport.mark()
    say(h, gossip(a, ann("b", incarnation=5)))
    assert events(router, since=mark) == []
    assert exchanges(transport, since=dials) == [B]


# -- forged announcements (issue #12) -------------------------------------------------------------------------


def forge(victim: PeerAnnouncement, **fields: Any) -> PeerAnnouncement:
    """What a hostile member relays: the victim's record pushed far ahead, its signature kept."""
    return replace(victim, **fields)


def test_a_members_forged_record_of_another_node_is_refused_and_its_real_updates_still_apply(
    h: Harness,
) -> None:
    start(h)
    router, transport = h.inboxes["router"], h.inboxes["transport"]
    attacker, victim = ann("a"), ann("b")
    say(h, gossip(attacker), gossip(victim))
    mark = router.mark()

    forged = forge(victim, version=10**12, serving=("fake-model",), models=("fake-model",))
    say(h, gossip(attacker, forged), gossip(attacker, forged))  # relayed every round
    assert events(router, since=mark) == []
    assert snapshot(transport) == (OWN, attacker, victim)  # not passed on either
    [refused] = h.log.events("gossip.refused")  # once per (sender, node), however often it comes
    assert refused["sender"] == A and refused["peer"] == B and refused["version"] == 10**12
    assert refused["reason"] == "bad signature" and refused["level"] == "warning"

    # The victim's real next version still propagates, directly and as hearsay.
    real = ann("b", version=1, serving=("m",))
    say(h, gossip(real))
    real2 = ann("b", version=2, serving=("m", "n"))
    say(h, gossip(attacker, forged, real2))
    assert events(router, since=mark) == [PeerUpdated(peer=real), PeerUpdated(peer=real2)]
    assert [p.serving for p in status(h).peers] == [(), ("m", "n")]


def test_a_record_re_signed_with_the_members_own_key_is_refused(h: Harness) -> None:
    start(h)
    attacker, victim = ann("a"), ann("b")
    say(h, gossip(attacker), gossip(victim))
    theirs = forge(victim, version=99, serving=("fake-model",), public_key=identity("a").public_key)
    forged = replace(theirs, signature=identity("a").sign(announcement_payload(theirs)))
    say(h, gossip(attacker, forged))
    assert [e["reason"] for e in h.log.events("gossip.refused")] == ["node id does not match the public key"]
    assert status(h).peers[1].serving == ()


def test_an_unsigned_peer_does_not_join_and_the_registry_keeps_working(h: Harness) -> None:
    start(h)
    unsigned = replace(ann("a"), signature=b"")
    junk = replace(ann("c"), public_key=b"short")
    say(h, GossipReceived(peer_id=A, announcements=(unsigned, junk)))
    assert events(h.inboxes["router"]) == [] and status(h).peers == ()
    assert {(e["peer"], e["reason"]) for e in h.log.events("gossip.refused")} == {
        (A, "signature of 0 bytes, not 64"),
        (C, "public key of 5 bytes, not 32"),
    }
    say(h, gossip(ann("a")))
    assert [p.node_id for p in status(h).peers] == [A]


def test_refusals_are_logged_once_per_sender_and_node_up_to_a_cap(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile member inventing node ids cannot flood the log."""
    monkeypatch.setattr(registry_module, "REFUSALS_LOGGED", 3)
    start(h)
    attacker = ann("a")
    say(h, gossip(attacker))
    strangers = [replace(ann(f"x{i}"), signature=bytes(64)) for i in range(6)]
    for _ in range(3):
        say(h, gossip(attacker, *strangers))
    assert [e["peer"] for e in h.log.events("gossip.refused")] == [nid(f"x{i}") for i in range(3)]
    assert len(h.log.events("gossip.refused_unlogged")) == 1
    assert exchanges(h.inboxes["transport"]) == []  # nor dialled on their say-so


def test_its_own_announcement_is_signed_again_at_each_version(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    assert refusal(snapshot(transport)[0]) is None
    say(h, SetLocalAnnouncement(models=("m",), serving=("m",), vram_bytes=200))
    say(h, SetDemand(demand={"m": 3.0}))
    own = snapshot(transport)[0]
    assert (own.version, own.demand, own.serving) == (2, {"m": 3.0}, ("m",))
    assert refusal(own) is None


# -- deaths and departures ------------------------------------------------------------------------------------


def test_declare_dead_publishes_the_death_and_broadcasts_it(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    a, b = ann("a", incarnation=3, models=("m", "n"), serving=("m",)), ann("b")
    say(h, gossip(a), gossip(b))
    mark = transport.mark()

    say(h, DeclareDead(node_id=A, reason="no answer for 3.5s"))
    for name in SUBSCRIBERS:
        assert events(h.inboxes[name])[-1] == PeerDied(node_id=A, incarnation=3, reason="no answer for 3.5s")
    assert transport.messages(since=mark) == [
        GossipSnapshot(gossip=Gossip(announcements=(OWN, b))),
        # What it served goes with it: the table pushed to passive nodes keeps those models, hostless.
        BroadcastPeerDown(notice=PeerDown(node_id=A, incarnation=3, reporter=ME), served=("m",)),
    ]
    reply = status(h)
    assert [p.node_id for p in reply.peers] == [B] and reply.dead == (A,)


def test_a_death_taken_from_a_notice_goes_to_passive_connections_only(h: Harness) -> None:
    """Members had the reporter's notice; our passive nodes hear of deaths only from us."""
    start(h)
    transport = h.inboxes["transport"]
    say(h, gossip(ann("a")))
    mark = transport.mark()
    say(h, DeclareDead(node_id=A, reason="reported by b", broadcast=False))
    assert events(h.inboxes["router"])[-1] == PeerDied(node_id=A, incarnation=1, reason="reported by b")
    assert transport.messages(since=mark) == [
        GossipSnapshot(gossip=Gossip(announcements=(OWN,))),
        BroadcastPeerDown(notice=PeerDown(node_id=A, incarnation=1, reporter=ME), members=False),
    ]


def test_declare_dead_about_a_node_it_does_not_know_does_nothing(h: Harness) -> None:
    start(h)
    say(h, gossip(ann("a")))
    marks = {name: inbox.mark() for name, inbox in h.inboxes.items()}
    say(h, DeclareDead(node_id="x", reason="?"))
    say(h, DeclareDead(node_id=A, reason="first"), DeclareDead(node_id=A, reason="again"))
    assert [m.reason for m in h.inboxes["router"].messages(PeerDied)] == ["first"]
    assert h.inboxes["transport"].count(BroadcastPeerDown, since=marks["transport"]) == 1


def test_a_dead_peer_comes_back_only_by_talking_to_us(h: Harness) -> None:
    start(h)
    router, transport = h.inboxes["router"], h.inboxes["transport"]
    a, b = ann("a", incarnation=3), ann("b")
    say(h, gossip(a), gossip(b), DeclareDead(node_id=A, reason="silent"))

    mark, dials = router.mark(), transport.mark()
    say(h, gossip(b, a), gossip(b, ann("a", incarnation=3, version=9)))  # stale gossip about it
    assert events(router, since=mark) == []
    assert exchanges(transport, since=dials) == []

    say(h, gossip(a))  # a direct exchange: it is alive after all
    assert events(router, since=mark) == [PeerJoined(peer=a)]
    assert status(h).dead == ()


def test_a_leaving_peer_is_a_departure(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    a, b = ann("a", incarnation=4), ann("b")
    say(h, gossip(a), gossip(b))
    marks = {name: inbox.mark() for name, inbox in h.inboxes.items()}

    say(h, PeerLeavingReceived(notice=PeerLeaving(node_id=A, incarnation=3)))  # an older life: ignored
    say(h, PeerLeavingReceived(notice=PeerLeaving(node_id="x", incarnation=1)))  # nobody we know
    assert all(inbox.mark() == marks[name] for name, inbox in h.inboxes.items())

    say(h, PeerLeavingReceived(notice=PeerLeaving(node_id=A, incarnation=4)))
    for name in SUBSCRIBERS:
        assert events(h.inboxes[name], since=marks[name]) == [PeerLeft(node_id=A, incarnation=4)]
    assert transport.messages(since=marks["transport"]) == [
        GossipSnapshot(gossip=Gossip(announcements=(OWN, b)))
    ]
    assert not h.inboxes["heartbeat"].messages()
    say(h, gossip(b, a))
    assert [p.node_id for p in status(h).peers] == [B]  # not brought back by hearsay


def test_a_death_notice_about_itself_is_not_acted_on(h: Harness) -> None:
    start(h)
    say(h, gossip(ann("a")))
    marks = {name: inbox.mark() for name, inbox in h.inboxes.items()}
    say(h, PeerDownReceived(notice=PeerDown(node_id=ME, incarnation=7, reporter=A), from_peer=A))
    assert all(inbox.mark() == marks[name] for name, inbox in h.inboxes.items())
    assert [e["reporter"] for e in h.log.events("mesh.reported_dead")] == [A]
    assert [p.node_id for p in status(h).peers] == [A]


def test_a_death_notice_about_a_known_peer_is_the_heartbeats_to_judge(h: Harness) -> None:
    start(h)
    heartbeat, router = h.inboxes["heartbeat"], h.inboxes["router"]
    say(h, gossip(ann("a", incarnation=3)))
    mark = router.mark()

    older = PeerDown(node_id=A, incarnation=2, reporter=B)
    current = PeerDown(node_id=A, incarnation=3, reporter=B)
    say(
        h,
        PeerDownReceived(notice=older, from_peer=B),  # about an older life: nothing to check
        PeerDownReceived(notice=current, from_peer=B),
    )
    assert heartbeat.messages() == [DeathReported(notice=current)]
    assert events(router, since=mark) == []  # no verdict of its own
    assert [p.node_id for p in status(h).peers] == [A]


def test_a_death_notice_about_a_stranger_keeps_it_from_being_dialled(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    a = ann("a")
    say(
        h,
        gossip(a),
        PeerDownReceived(notice=PeerDown(node_id=C, incarnation=3, reporter=B), from_peer=B),
    )
    assert status(h).dead == (C,)
    assert not h.inboxes["heartbeat"].messages()

    say(h, gossip(a, ann("c", incarnation=3)))  # stale news of the dead life
    assert exchanges(transport) == []
    say(h, gossip(a, ann("c", incarnation=4)))  # a newer life is worth meeting
    assert exchanges(transport) == [C]


def test_connection_lost_is_left_to_the_heartbeat(h: Harness) -> None:
    start(h)
    say(h, gossip(ann("a")))
    marks = {name: inbox.mark() for name, inbox in h.inboxes.items()}
    say(h, ConnectionLost(node_id=A, reason="idle"))
    assert all(inbox.mark() == marks[name] for name, inbox in h.inboxes.items())
    assert [p.node_id for p in status(h).peers] == [A]


# -- subscribers, the local announcement, status -------------------------------------------------------------


def test_a_late_subscriber_hears_of_every_known_peer(h: Harness) -> None:
    start(h, subscribe=())
    a, b = ann("a"), ann("b", version=4)
    late = h.dummy("late")
    say(h, gossip(a), gossip(b))
    assert late.messages() == []  # not subscribed yet

    say(h, Subscribe(subscriber="late"), Subscribe(subscriber="late"))
    assert late.messages() == [PeerJoined(peer=a), PeerJoined(peer=b)] * 2
    mark = late.mark()
    c = ann("c")
    say(h, gossip(c))
    assert late.messages(since=mark) == [PeerJoined(peer=c)]  # subscribed once: told once


def test_set_local_announcement_bumps_the_version_and_gossips_it(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    a, b = ann("a"), ann("b")
    say(h, gossip(a), gossip(b))
    mark = transport.mark()

    say(h, SetLocalAnnouncement(models=("m", "n"), serving=("m",), vram_bytes=200, rpc_ready=("n",)))
    me = signed(replace(OWN, models=("m", "n"), serving=("m",), vram_bytes=200, rpc_ready=("n",), version=1))
    assert transport.messages(since=mark)[0] == GossipSnapshot(gossip=Gossip(announcements=(me, a, b)))
    sent = transport.messages(ExchangeGossip, since=mark)
    assert sorted(m.node_id for m in sent) == sorted([A, B])  # every peer hears of it at once
    assert all(m.gossip.announcements[0] == me for m in sent)

    mark = transport.mark()
    say(h, SetLocalAnnouncement(models=("m", "n"), serving=("m",), vram_bytes=200, rpc_ready=("n",)))
    assert transport.messages(since=mark) == []  # nothing new to say
    say(h, SetLocalAnnouncement(models=("m", "n"), serving=(), vram_bytes=200, rpc_ready=("n",)))
    assert snapshot(transport)[0] == signed(replace(me, serving=(), version=2))


def test_the_sizes_of_its_models_travel_in_its_announcement(h: Harness) -> None:
    """Other nodes know a model only by name: its size comes from the nodes that have it (the
    console's usage bars need it)."""
    start(h)
    transport = h.inboxes["transport"]
    say(h, SetLocalAnnouncement(models=("m",), serving=("m",), vram_bytes=200, model_bytes={"m": 12345}))
    assert snapshot(transport)[0].model_bytes == {"m": 12345}


def test_gpu_free_memory_is_announced_again_when_it_moves_enough(h: Harness) -> None:
    """The GPUs are read again on a timer; only a move of 256 MiB or more makes a new version."""
    for name in ("transport", "heartbeat"):
        h.dummy(name)
    gib = 1 << 30
    now = [(GpuReport("H200", 141 * gib, 140 * gib),)]
    own = replace(OWN, gpus=now[0])
    PeerRegistry.start(
        h.directory, h.logger, own=own, timing=QUIET, signer=identity("me"), gpus_now=lambda: now[0]
    )
    settle(h)
    transport = h.inboxes["transport"]
    now[0] = (GpuReport("H200", 141 * gib, 140 * gib - (100 << 20)),)
    mark = transport.mark()
    say(h, Tick("gpus"))
    assert transport.messages(since=mark) == [], "a 100 MiB move is not worth a new version"
    now[0] = (GpuReport("H200", 141 * gib, 130 * gib),)
    say(h, Tick("gpus"))
    assert snapshot(transport)[0].gpus == now[0] and snapshot(transport)[0].version == 1


def test_gpus_moved_is_a_pure_threshold() -> None:
    a = (GpuReport("A", 100, 50),)
    assert not gpus_moved(a, a)
    assert not gpus_moved(a, (GpuReport("A", 100, 50 + GPU_MOVE_BYTES - 1),))
    assert gpus_moved(a, (GpuReport("A", 100, 50 + GPU_MOVE_BYTES),))
    assert gpus_moved(a, (GpuReport("B", 100, 50),)) and gpus_moved(a, ()) and gpus_moved((), a)


def test_get_status_describes_the_node_and_its_peers(h: Harness) -> None:
    start(h)
    gpu = GpuReport(name="NVIDIA L4", total_bytes=24 << 30, free_bytes=20 << 30)
    a = ann(
        "a",
        vram_bytes=64,
        models=("m",),
        serving=("m",),
        addrs=("10.0.0.1:9",),
        model_bytes={"m": 48},
        gpus=(gpu,),
    )
    say(h, gossip(a), gossip(ann("b")), DeclareDead(node_id=B, reason="silent"))
    reply = status(h)
    assert (reply.node_id, reply.name, reply.role, reply.vram_bytes) == (ME, "me-name", "active", 100)
    [peer] = reply.peers
    assert replace(peer, last_seen_s=0.0) == PeerStatus(
        node_id=A,
        name="n-a",
        role="active",
        vram_bytes=64,
        models=("m",),
        serving=("m",),
        last_seen_s=0.0,
        addrs=("10.0.0.1:9",),
        model_bytes={"m": 48},
        gpus=(gpu,),
    )
    assert 0.0 <= peer.last_seen_s < 5.0
    assert reply.dead == (B,)


# -- joining, dialling, gossip rounds --------------------------------------------------------------------------


def test_join_mesh_dials_the_seeds(h: Harness) -> None:
    start(h)
    transport = h.inboxes["transport"]
    say(
        h,
        JoinMesh(seeds=(Seed("s1", ("s1.test:1",)), Seed(ME, ("me.test:1",)), Seed("s2", ("s2.test:1",)))),
    )
    sent = transport.messages(ExchangeGossip)
    assert [(m.node_id, m.addrs) for m in sent] == [("s1", ("s1.test:1",)), ("s2", ("s2.test:1",))]
    assert all(m.gossip == Gossip(announcements=(OWN,)) for m in sent)


def test_a_failed_seed_is_dialled_again_after_a_backoff(h: Harness, clock: FakeClock) -> None:
    start(h)
    transport = h.inboxes["transport"]
    say(h, JoinMesh(seeds=(Seed("s1", ("s1.test:1",)),)))
    assert exchanges(transport) == ["s1"]

    say(h, GossipFailed(node_id="s1", addrs=("s1.test:1",), reason="refused"))
    assert [e["peer"] for e in h.log.events("mesh.join_failed")] == ["s1"]
    clock.advance(DIAL_BACKOFF_S / 2)
    say(h, Tick("gossip"))
    assert exchanges(transport) == ["s1"]
    clock.advance(DIAL_BACKOFF_S / 2)
    say(h, Tick("gossip"))
    assert exchanges(transport) == ["s1", "s1"]

    say(h, GossipFailed(node_id="s1", addrs=("s1.test:1",), reason="refused"))  # the backoff doubles
    clock.advance(DIAL_BACKOFF_S * 2 - 0.25)
    say(h, Tick("gossip"))
    assert exchanges(transport) == ["s1", "s1"]
    clock.advance(0.25)
    say(h, Tick("gossip"))
    assert exchanges(transport) == ["s1", "s1", "s1"]


def test_the_dead_are_dialled_again_until_their_record_expires(h: Harness, clock: FakeClock) -> None:
    start(h)
    transport = h.inboxes["transport"]
    say(h, gossip(ann("a", incarnation=2)), DeclareDead(node_id=A, reason="silent"))
    mark = transport.mark()
    clock.advance(GRAVE_REDIAL_S - 0.25)
    say(h, Tick("gossip"))
    assert exchanges(transport, since=mark) == []
    clock.advance(0.25)
    say(h, Tick("gossip"))  # two nodes that buried each other by mistake meet again this way
    assert exchanges(transport, since=mark) == [A]

    clock.advance(QUIET.dead_ttl_s)
    say(h, Tick("gossip"))
    assert status(h).dead == ()
    assert exchanges(transport, since=mark) == [A]
    say(h, gossip(ann("b"), ann("a", incarnation=2)))  # forgotten: hearsay may bring it back now
    assert exchanges(transport, since=mark) == [A, A]


def test_its_gossip_timer_exchanges_with_peers(h: Harness) -> None:
    start(h, TimingSection(gossip_interval_s=0.05))
    transport = h.inboxes["transport"]
    a = ann("a")
    say(h, gossip(a))
    exchange = transport.wait_for(ExchangeGossip, lambda m: m.node_id == A, n=3)
    assert exchange.addrs == a.addrs and exchange.gossip == Gossip(announcements=(OWN, a))
