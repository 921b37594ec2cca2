"""The Heartbeat actor alone: fed topology events and probe results as msgpack messages, with dummy
"registry" and "transport" actors recording what it tells them.

Two kinds of test: a few with small real timings, where the actor's own timers drive the probes and the
death; and the rest with a fake clock (probe timers far in the future), where the test sends the
ticks and moves time by hand, so the windows are checked exactly.
"""

from __future__ import annotations

import pytest

import actors.heartbeat as heartbeat_module
from actors.heartbeat import CHECKS_PER_PROBE, LATE_TICKS, REPORT_TRUST_INTERVALS, Heartbeat
from meshllm.config import TimingSection
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    ConnectionLost,
    DeathReported,
    DeclareDead,
    LoopPulse,
    PeerAnnouncement,
    PeerDied,
    PeerDown,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    ProbePeer,
    ProbeResult,
    Subscribe,
    Tick,
)
from tests.actor_dummies import FakeClock, Harness, Inbox, Reaction

NOBODY = ProbeResult(node_id="nobody", ok=True, rtt_ms=0.0)
"""A probe result about a node the heartbeat does not follow: handled, and changes nothing."""

# Fake-clock tests: the actor's own timers would fire only after these long intervals.
SLOW = TimingSection(probe_interval_s=30.0, dead_after_s=90.0)
TRUST_S = SLOW.probe_interval_s * REPORT_TRUST_INTERVALS
CHECK_S = SLOW.probe_interval_s / CHECKS_PER_PROBE


def ann(node_id: str, *addrs: str) -> PeerAnnouncement:
    return PeerAnnouncement(
        node_id=node_id,
        name=f"n-{node_id}",
        role="active",
        addrs=addrs or (f"{node_id}.test:1",),
        vram_bytes=1,
    )


def start(
    h: Harness, timing: TimingSection, transport_reactions: dict[type[Message], Reaction] | None = None
) -> None:
    h.dummy("registry")
    h.dummy("transport", transport_reactions)
    Heartbeat.start(h.directory, h.logger, timing=timing)


def settle(h: Harness) -> None:
    h.settle("heartbeat", NOBODY)


def say(h: Harness, *msgs: Message) -> None:
    """Tell the heartbeat these messages and wait until it has handled them (so they are handled at
    the fake clock's present time, not after the test moves it)."""
    for msg in msgs:
        h.tell("heartbeat", msg)
    settle(h)


def probes(transport: Inbox, node_id: str, since: int = 0) -> list[ProbePeer]:
    return transport.messages(ProbePeer, lambda m: m.node_id == node_id, since)


def deaths(registry: Inbox, node_id: str | None = None) -> list[DeclareDead]:
    return registry.messages(DeclareDead, lambda m: node_id is None or m.node_id == node_id)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock().install(monkeypatch, heartbeat_module)


def tick(h: Harness, name: str) -> None:
    """One timer tick ("probe": probe and check deadlines; anything else: only check)."""
    h.tell("heartbeat", Tick(name))
    settle(h)


def elapse(h: Harness, clock: FakeClock, seconds: float, step: float = CHECK_S) -> None:
    """Let ``seconds`` pass as they do on a node that is not stalled: a "check" tick every check
    interval (``step``), then one at the end. Time that passes without ticks is a stall of the node's
    own, which the heartbeat does not count as its peers' silence."""
    left = seconds
    while left > 0:
        clock.advance(min(step, left))
        left -= step
        tick(h, "check")


# -- with its own timers ----------------------------------------------------------------------------------


def test_subscribes_to_the_registry(h: Harness) -> None:
    start(h, SLOW)
    assert h.inboxes["registry"].wait_for(Subscribe) == Subscribe(subscriber="heartbeat")


def test_probes_each_followed_peer_on_its_probe_tick(h: Harness) -> None:
    timing = TimingSection(probe_interval_s=0.05, dead_after_s=30.0)
    start(h, timing)
    transport = h.inboxes["transport"]
    h.tell("heartbeat", PeerJoined(peer=ann("a", "a.test:1")))
    h.tell("heartbeat", PeerJoined(peer=ann("b")))
    # Each probe may be answered until the peer would be declared dead: on a loaded node or path a
    # ping takes over an interval, and when probes gave up after one, peers that went on answering
    # late were declared dead (ten nodes starting in one process buried each other).
    assert transport.wait_for(ProbePeer, lambda m: m.node_id == "a", n=2) == ProbePeer(
        "a", ("a.test:1",), timing.dead_after_s
    )
    transport.wait_for(ProbePeer, lambda m: m.node_id == "b", n=2)

    # New addresses are probed from then on; news about a peer it does not follow is not followed.
    h.tell("heartbeat", PeerUpdated(peer=ann("a", "a.test:2")))
    h.tell("heartbeat", PeerUpdated(peer=ann("x")))
    settle(h)
    mark = transport.mark()
    assert transport.wait_for(ProbePeer, lambda m: m.node_id == "a", since=mark).addrs == ("a.test:2",)
    transport.wait_for(ProbePeer, lambda m: m.node_id == "b", n=3, since=mark)
    assert not probes(transport, "x")
    assert not h.inboxes["registry"].messages(DeclareDead)


def test_a_silent_peer_is_declared_dead_once_and_an_answering_one_is_not(h: Harness) -> None:
    timing = TimingSection(probe_interval_s=0.05, dead_after_s=0.5)

    def answer(msg: Message) -> None:
        # A fake transport: "alive" answers every probe, "silent" never does.
        assert isinstance(msg, ProbePeer)
        if msg.node_id == "alive":
            h.tell("heartbeat", ProbeResult(node_id="alive", ok=True, rtt_ms=1.0))

    start(h, timing, {ProbePeer: answer})
    registry, transport = h.inboxes["registry"], h.inboxes["transport"]
    h.tell("heartbeat", PeerJoined(peer=ann("alive")))
    h.tell("heartbeat", PeerJoined(peer=ann("silent")))

    dead = registry.wait_for(DeclareDead)
    assert dead.node_id == "silent" and dead.broadcast is True
    assert dead.reason.startswith("no answer for")

    # Time goes on (the answering peer's probes are the clock): no second verdict, no more probes of it.
    settle(h)
    mark = transport.mark()
    transport.wait_for(ProbePeer, lambda m: m.node_id == "alive", n=6, since=mark)
    settle(h)
    assert deaths(registry) == [dead]
    assert not probes(transport, "silent", since=mark)


# -- with a fake clock --------------------------------------------------------------------------------------


def test_deadline_counts_from_the_last_good_answer(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    registry = h.inboxes["registry"]
    say(h, PeerJoined(peer=ann("a")))

    clock.advance(SLOW.dead_after_s - 10)
    say(h, ProbeResult(node_id="a", ok=True, rtt_ms=2.0))  # resets the silence
    clock.advance(SLOW.dead_after_s - 10)
    say(h, ProbeResult(node_id="a", ok=False, rtt_ms=0.0, error="timeout"))  # does not
    tick(h, "check")
    assert not deaths(registry)

    clock.advance(10)  # dead_after_s since the last good answer
    tick(h, "check")
    dead = deaths(registry)
    assert [(d.node_id, d.broadcast) for d in dead] == [("a", True)]
    assert dead[0].reason == f"no answer for {SLOW.dead_after_s:.1f}s"


def test_declared_exactly_once_and_no_longer_probed(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    registry, transport = h.inboxes["registry"], h.inboxes["transport"]
    say(h, PeerJoined(peer=ann("a")), PeerJoined(peer=ann("b")))
    elapse(h, clock, SLOW.dead_after_s / 2)
    say(h, PeerJoined(peer=ann("b")))  # a (re)join counts as hearing from it
    elapse(h, clock, SLOW.dead_after_s / 2)

    tick(h, "probe")  # a's deadline has passed: declared, and not probed
    assert [d.node_id for d in deaths(registry)] == ["a"]
    assert [p.node_id for p in transport.messages(ProbePeer)] == ["b"]

    for _ in range(3):
        elapse(h, clock, SLOW.probe_interval_s)
        tick(h, "probe")
    assert [d.node_id for d in deaths(registry)] == ["a", "b"]  # b in its turn; a not again
    assert not probes(transport, "a")


def test_a_declared_peer_that_joins_again_is_followed_again(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    registry, transport = h.inboxes["registry"], h.inboxes["transport"]
    say(h, PeerJoined(peer=ann("a")))
    elapse(h, clock, SLOW.dead_after_s)
    assert len(deaths(registry, "a")) == 1

    say(h, PeerJoined(peer=ann("a")))  # it came back (a direct gossip exchange)
    tick(h, "probe")
    assert len(probes(transport, "a")) == 1
    assert len(deaths(registry, "a")) == 1
    elapse(h, clock, SLOW.dead_after_s)
    assert len(deaths(registry, "a")) == 2


def test_a_death_report_within_the_trust_window_is_disputed(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    registry, transport = h.inboxes["registry"], h.inboxes["transport"]
    say(h, PeerJoined(peer=ann("a")))
    clock.advance(TRUST_S - 1)

    say(h, DeathReported(notice=PeerDown(node_id="a", incarnation=0, reporter="r")))
    assert not deaths(registry)
    # Instead of believing it, the heartbeat checks at once.
    assert transport.messages(ProbePeer) == [ProbePeer("a", ("a.test:1",), SLOW.dead_after_s)]
    [disputed] = h.log.events("peer.death_disputed")
    assert disputed["peer"] == "a" and disputed["reporter"] == "r"


def test_a_death_report_after_the_trust_window_is_accepted_once(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    registry = h.inboxes["registry"]
    say(h, PeerJoined(peer=ann("a")))
    clock.advance(TRUST_S)

    notice = PeerDown(node_id="a", incarnation=0, reporter="r")
    say(h, DeathReported(notice=notice), DeathReported(notice=notice))
    clock.advance(SLOW.dead_after_s)
    tick(h, "check")  # its own deadline passes too: still one verdict
    [dead] = deaths(registry)
    # A verdict taken from someone else's notice is not broadcast again.
    assert dead.node_id == "a" and dead.broadcast is False
    assert dead.reason == f"reported by r, silent for {TRUST_S:.1f}s"


def test_a_death_report_about_a_peer_it_does_not_follow_is_ignored(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    clock.advance(SLOW.dead_after_s)
    say(h, DeathReported(notice=PeerDown(node_id="x", incarnation=0, reporter="r")))
    assert not deaths(h.inboxes["registry"])
    assert not h.inboxes["transport"].messages(ProbePeer)


@pytest.mark.parametrize("gone", [PeerLeft(node_id="a", incarnation=0), PeerDied("a", 0, "probes failed")])
def test_a_peer_that_left_or_died_is_no_longer_probed(h: Harness, clock: FakeClock, gone: Message) -> None:
    start(h, SLOW)
    registry, transport = h.inboxes["registry"], h.inboxes["transport"]
    say(h, PeerJoined(peer=ann("a")), PeerJoined(peer=ann("b")))
    tick(h, "probe")
    assert sorted(p.node_id for p in transport.messages(ProbePeer)) == ["a", "b"]

    say(h, gone)
    mark = transport.mark()
    tick(h, "probe")
    elapse(h, clock, SLOW.dead_after_s)
    say(
        h,
        ConnectionLost(node_id="a", reason="closed"),
        DeathReported(notice=PeerDown(node_id="a", incarnation=0, reporter="r")),
    )
    tick(h, "check")
    assert [p.node_id for p in transport.messages(ProbePeer, since=mark)] == ["b"]
    assert [d.node_id for d in deaths(registry)] == ["b"]


def test_a_lost_connection_is_probed_at_once(h: Harness, clock: FakeClock) -> None:
    start(h, SLOW)
    transport = h.inboxes["transport"]
    say(
        h,
        PeerJoined(peer=ann("a")),
        ConnectionLost(node_id="a", reason="idle timeout"),
        ConnectionLost(node_id="stranger", reason="idle timeout"),
    )
    assert transport.messages(ProbePeer) == [ProbePeer("a", ("a.test:1",), SLOW.dead_after_s)]
    assert not deaths(h.inboxes["registry"])


def test_a_stall_of_its_own_is_not_counted_as_its_peers_silence(h: Harness, clock: FakeClock) -> None:
    """The node's ticks stop for a minute (its process got no CPU): the silence it could not hear
    through is forgiven, said in the log, and the deadline counts on from there."""
    start(h, SLOW)
    registry = h.inboxes["registry"]
    say(h, PeerJoined(peer=ann("a")))
    elapse(h, clock, SLOW.dead_after_s - 20)

    clock.advance(60)  # no tick for 60 s
    tick(h, "check")
    assert not deaths(registry)
    stalled = 60 - LATE_TICKS * CHECK_S  # a tick gap up to LATE_TICKS intervals is the node's own pace
    [logged] = h.log.events("heartbeat.stalled")
    assert logged["stalled_s"] == pytest.approx(stalled, abs=0.01)

    left = 20 - (60 - stalled)  # until the deadline, the stall left out
    elapse(h, clock, left - 0.5)
    assert not deaths(registry)
    elapse(h, clock, 0.5)
    [dead] = deaths(registry)
    assert dead.node_id == "a" and dead.reason == f"no answer for {SLOW.dead_after_s:.1f}s"


def elapse_pulsing(h: Harness, clock: FakeClock, seconds: float) -> None:
    """Let time pass with the transport's loop on time: a pulse and a check each second."""
    left = seconds
    while left > 0:
        clock.advance(min(1.0, left))
        left -= 1.0
        h.tell("heartbeat", LoopPulse(lost_s=0.0))
        tick(h, "check")


def test_while_the_transport_loop_is_stalled_nobody_is_declared_dead(h: Harness, clock: FakeClock) -> None:
    """The transport's loop stops pulsing while this actor ticks on time: no answer can be read, so
    no verdict is given; when the loop runs again, the time it says it lost is forgiven."""
    start(h, SLOW)
    registry = h.inboxes["registry"]
    say(h, PeerJoined(peer=ann("a")), LoopPulse(lost_s=0.0))
    elapse(h, clock, SLOW.dead_after_s + 10)  # ticks on time, no pulse
    assert not deaths(registry)

    say(h, LoopPulse(lost_s=SLOW.dead_after_s + 9))  # running again: a's silence counts 1 s
    [logged] = h.log.events("heartbeat.stalled")
    assert logged["where"] == "transport"
    elapse_pulsing(h, clock, SLOW.dead_after_s - 1.5)
    assert not deaths(registry)
    elapse_pulsing(h, clock, 1.0)
    assert [d.node_id for d in deaths(registry)] == ["a"]


def test_a_stall_of_the_whole_process_is_forgiven_once(h: Harness, clock: FakeClock) -> None:
    """The ticks and the loop were both stalled for 60 s: both say so, and 60 s are forgiven, not
    twice that."""
    start(h, SLOW)
    registry = h.inboxes["registry"]
    say(h, PeerJoined(peer=ann("a")), LoopPulse(lost_s=0.0))
    elapse_pulsing(h, clock, SLOW.dead_after_s - 20)
    clock.advance(60)
    tick(h, "check")
    say(h, LoopPulse(lost_s=60 - 0.25))
    left = 20 - 0.25  # the loop's 59.75 s cover the ticks' 48.75 s: the rest of the 60 s counts
    elapse_pulsing(h, clock, left - 0.5)
    assert not deaths(registry)
    elapse_pulsing(h, clock, 1.0)
    assert [d.node_id for d in deaths(registry)] == ["a"]


def test_ticks_a_little_late_forgive_nothing(h: Harness, clock: FakeClock) -> None:
    """Ticks within LATE_TICKS check intervals of each other are a busy node, not a stalled one: the
    deadline holds to the second."""
    start(h, SLOW)
    registry = h.inboxes["registry"]
    say(h, PeerJoined(peer=ann("a")))
    late = CHECK_S * (LATE_TICKS - 0.05)
    elapse(h, clock, SLOW.dead_after_s - 1, step=late)
    assert not deaths(registry)
    elapse(h, clock, 1, step=late)
    assert [d.node_id for d in deaths(registry)] == ["a"]
    assert not h.log.events("heartbeat.stalled")


def test_a_death_report_after_a_stall_is_disputed(h: Harness, clock: FakeClock) -> None:
    """Another node's death notice about a peer this node could not hear during its own stall: the
    stall is not silence, so the notice is checked with a probe, not believed."""
    start(h, SLOW)
    registry, transport = h.inboxes["registry"], h.inboxes["transport"]
    say(h, PeerJoined(peer=ann("a")))
    tick(h, "check")
    clock.advance(TRUST_S + 60)
    tick(h, "check")
    say(h, DeathReported(notice=PeerDown(node_id="a", incarnation=0, reporter="r")))
    assert not deaths(registry)
    assert transport.messages(ProbePeer, lambda m: m.node_id == "a")
