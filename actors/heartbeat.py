"""Heartbeat actor: owns the probe schedule and the last good answer of every active peer.

Each interval it asks the transport to probe every peer it follows (a QUIC ping, or a re-dial when
the connection is gone). A peer that has not answered for ``dead_after_s`` is reported to the
registry, which buries it and broadcasts the death. It follows the registry's topology events.

Silence is counted only while this node could listen. When its own ticks come late (the process was
starved of CPU, or its threads of the GIL), its probes went out late and their answers were read
late too, so the time its ticks lost is added to every peer's last good answer: a node that was
stalled for three seconds does not wake up and bury every peer it could not hear meanwhile. The
transport's event loop, where pings are sent and answers read, can be starved while this actor's
ticks are not. It pulses every second (:class:`LoopPulse`): while its pulses stop, nobody is
declared dead, and the time it lost, which its next pulse says, is forgiven the same way.
"""

from __future__ import annotations

import time

from actors.base import Directory, MsgpackActor, handles
from meshllm.config import TimingSection
from meshllm.logsetup import Logger
from meshllm.wire.messages import (
    ConnectionLost,
    DeathReported,
    DeclareDead,
    LoopPulse,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    ProbePeer,
    ProbeResult,
    Subscribe,
    Tick,
)

REPORT_TRUST_INTERVALS = 1.5
"""A death notice is accepted when we have not heard from the peer for this many probe intervals."""
CHECKS_PER_PROBE = 4
"""Deadlines are checked this many times per probe interval."""
LATE_TICKS = 1.5
"""A tick gap over this many check intervals means this node was stalled for the time beyond it."""
TRANSPORT_SILENT_S = 2.0
"""No pulse from the transport's loop for this long (it pulses every second): it is stalled."""
STALL_LOGGED_S = 1.0
"""Stalls at least this long are logged (``heartbeat.stalled``)."""


class Heartbeat(MsgpackActor):
    """Probes active peers and declares the silent ones dead."""

    name = "heartbeat"

    def __init__(self, directory: Directory, logger: Logger, timing: TimingSection) -> None:
        super().__init__(directory, logger)
        self.timing = timing
        self.addrs: dict[str, tuple[str, ...]] = {}
        self.last_ok: dict[str, float] = {}
        self.declared: set[str] = set()
        self.last_tick: float | None = None
        self.transport_pulse: float | None = None  # when the transport's loop last said it runs
        self.forgiven = (0.0, 0.0)  # the stretch of time last forgiven (monotonic clock)

    def on_start(self) -> None:
        self.tell("registry", Subscribe(subscriber=self.name))
        self.tell("transport", Subscribe(subscriber=self.name))  # its loop's pulse (LoopPulse)
        self.every(self.timing.probe_interval_s, "probe")
        # Deadlines are checked more often than probes are sent, so a death is declared within
        # a quarter interval of dead_after_s rather than up to a whole interval late.
        self.every(self.timing.probe_interval_s / CHECKS_PER_PROBE, "check")

    def _follow(self, node_id: str, addrs: tuple[str, ...]) -> None:
        self.addrs[node_id] = addrs
        self.last_ok.setdefault(node_id, time.monotonic())
        self.declared.discard(node_id)

    def _unfollow(self, node_id: str) -> None:
        self.addrs.pop(node_id, None)
        self.last_ok.pop(node_id, None)
        self.declared.discard(node_id)

    def _probe(self, node_id: str, addrs: tuple[str, ...]) -> None:
        # An answer counts until the peer would be declared dead, not only within one interval: on a
        # loaded path (a busy node, a slow link) answers take over a second, and one that came was
        # thrown away as a failure while the peer went on answering (false deaths while ten nodes
        # started in one process). Probes overlap then; a dead peer is still declared on time, by
        # the silence check in on_tick.
        self.tell("transport", ProbePeer(node_id, addrs, self.timing.dead_after_s))

    @handles(PeerJoined)
    def on_joined(self, msg: PeerJoined) -> None:
        self._follow(msg.peer.node_id, msg.peer.addrs)
        self.last_ok[msg.peer.node_id] = time.monotonic()

    @handles(PeerUpdated)
    def on_updated(self, msg: PeerUpdated) -> None:
        if msg.peer.node_id in self.addrs:
            self.addrs[msg.peer.node_id] = msg.peer.addrs

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        self._unfollow(msg.node_id)

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        self._unfollow(msg.node_id)

    @handles(ConnectionLost)
    def on_connection_lost(self, msg: ConnectionLost) -> None:
        if msg.node_id in self.addrs:
            # Probe now rather than at the next tick: a lost connection is the earliest sign of death.
            self._probe(msg.node_id, self.addrs[msg.node_id])

    @handles(DeathReported)
    def on_death_reported(self, msg: DeathReported) -> None:
        node_id = msg.notice.node_id
        if node_id not in self.addrs or node_id in self.declared:
            return
        now = time.monotonic()
        silent = now - self.last_ok.get(node_id, 0.0)
        trusted = silent >= self.timing.probe_interval_s * REPORT_TRUST_INTERVALS
        if trusted and not self._transport_stalled(now):
            self.declared.add(node_id)
            reason = f"reported by {msg.notice.reporter}, silent for {silent:.1f}s"
            self.tell("registry", DeclareDead(node_id=node_id, reason=reason, broadcast=False))
        else:
            # We heard from it moments ago (or our own loop is stalled, so we cannot know): one slow
            # peer's verdict does not bury it for everyone.
            self.log.info(
                "peer.death_disputed", peer=node_id, reporter=msg.notice.reporter, silent_s=round(silent, 2)
            )
            self._probe(node_id, self.addrs[node_id])

    @handles(ProbeResult)
    def on_result(self, msg: ProbeResult) -> None:
        if msg.node_id in self.addrs and msg.ok:
            self.last_ok[msg.node_id] = time.monotonic()

    def _forgive_stall(self, now: float) -> None:
        """Add the time lost since the last tick, beyond :data:`LATE_TICKS` check intervals, to every
        peer's last good answer: silence this node could not have heard through is not theirs."""
        previous, self.last_tick = self.last_tick, now
        if previous is None:
            return
        check_s = self.timing.probe_interval_s / CHECKS_PER_PROBE
        self._forgive(now - previous - LATE_TICKS * check_s, now, "heartbeat")

    def _forgive(self, lost: float, now: float, where: str) -> None:
        if lost <= 0:
            return
        # A stall of the whole process is seen twice, by this actor's ticks and by the loop's pulse:
        # the part of [now - lost, now] already forgiven is not forgiven again.
        start, (done_from, done_to) = now - lost, self.forgiven
        overlap = max(0.0, min(now, done_to) - max(start, done_from))
        self.forgiven = (min(start, done_from) if overlap else start, now)
        lost -= overlap
        if lost <= 0:
            return
        for node_id, last in self.last_ok.items():
            self.last_ok[node_id] = min(now, last + lost)
        if lost >= STALL_LOGGED_S:
            self.log.warning(
                "heartbeat.stalled",
                stalled_s=round(lost, 2),
                where=where,
                reason=f"this node's own {where} ran late; peers' silence meanwhile is not counted",
            )

    @handles(LoopPulse)
    def on_loop_pulse(self, msg: LoopPulse) -> None:
        # The transport's loop, not this actor, may have been starved: its probes went out late and
        # their answers were read late, though this actor's ticks came on time.
        now = time.monotonic()
        self.transport_pulse = now
        self._forgive(msg.lost_s, now, "transport")

    def _transport_stalled(self, now: float) -> bool:
        """The transport's loop has not pulsed for :data:`TRANSPORT_SILENT_S`: it is stalled now,
        so whatever it would have heard from peers is unread, and the silence is not theirs."""
        return self.transport_pulse is not None and now - self.transport_pulse > TRANSPORT_SILENT_S

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        now = time.monotonic()
        self._forgive_stall(now)
        if self._transport_stalled(now):
            return  # nobody is judged (or probed: the loop is behind already) until it runs again
        for node_id, addrs in self.addrs.items():
            if node_id in self.declared:
                continue
            silent = now - self.last_ok.get(node_id, now)
            if silent >= self.timing.dead_after_s:
                self.declared.add(node_id)
                reason = f"no answer for {silent:.1f}s"
                self.tell("registry", DeclareDead(node_id=node_id, reason=reason))
            elif msg.name == "probe":
                self._probe(node_id, addrs)
