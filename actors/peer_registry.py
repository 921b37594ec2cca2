"""PeerRegistry actor: owns the set of active peers, their announcements, and the dead set.

It decides whom to gossip with and when, turns gossip and notices into topology events for its
subscribers (PeerJoined, PeerUpdated, PeerDied, PeerLeft), and keeps the transport's gossip snapshot
current. The merge rules live in :mod:`meshllm.peerview`.

It signs its own announcement with the node key (a :class:`~meshllm.wire.announcement.Signer` given
at construction) each time it changes, since other nodes refuse unsigned records; records that fail
their check here are dropped and logged once per (sender, node), so a hostile peer repeating a
forgery every round - or inventing node ids - cannot flood the log.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace

from actors.base import Directory, MsgpackActor, handles
from meshllm.config import TimingSection
from meshllm.logsetup import Logger
from meshllm.peerview import Change, PeerView
from meshllm.wire.announcement import Signer, sign_announcement
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
    PeerLeavingReceived,
    PeerLeft,
    PeerStatus,
    PeerUpdated,
    SetDemand,
    SetLocalAnnouncement,
    StatusReply,
    Subscribe,
    Tick,
)

GOSSIP_FANOUT = 3
DIAL_BACKOFF_S = 1.0
DIAL_BACKOFF_MAX_S = 30.0
GRAVE_REDIAL_S = 5.0
GPU_REFRESH_S = 5.0
GPU_MOVE_BYTES = 256 << 20
REFUSALS_LOGGED = 1024
"""(sender, node) pairs whose refused records were logged; past this, one line says more are unlogged."""


def gpus_moved(old: tuple[GpuReport, ...], new: tuple[GpuReport, ...]) -> bool:
    """Whether ``new`` is worth a new announcement: other GPUs, or free memory moved by at least
    :data:`GPU_MOVE_BYTES` on one of them (smaller moves would only churn versions)."""
    if [(g.name, g.total_bytes) for g in old] != [(g.name, g.total_bytes) for g in new]:
        return True
    return any(abs(a.free_bytes - b.free_bytes) >= GPU_MOVE_BYTES for a, b in zip(old, new, strict=True))


class PeerRegistry(MsgpackActor):
    """The node's view of the active mesh."""

    name = "registry"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        own: PeerAnnouncement,
        timing: TimingSection,
        signer: Signer,
        gpus_now: Callable[[], tuple[GpuReport, ...]] | None = None,
    ) -> None:
        super().__init__(directory, logger)
        self.signer = signer
        self.own = sign_announcement(own, signer)
        self.timing = timing
        self.gpus_now = gpus_now
        self.view = PeerView(own.node_id, timing.dead_ttl_s)
        self.subscribers: list[str] = []
        self.refusals_logged: set[tuple[str, str]] = set()
        self.refusals_unlogged = 0

    def on_start(self) -> None:
        self._push_snapshot()
        self.every(self.timing.gossip_interval_s, "gossip", jitter=0.2)
        if self.gpus_now is not None:
            self.every(GPU_REFRESH_S, "gpus")

    # -- helpers ------------------------------------------------------------------------------------------

    def _gossip(self) -> Gossip:
        return Gossip(announcements=(self.own, *self.view.peers.values()))

    def _push_snapshot(self) -> None:
        self.tell("transport", GossipSnapshot(gossip=self._gossip()))

    def _publish(self, event: Message) -> None:
        for name in self.subscribers:
            self.tell(name, event)

    def _exchange(self, node_id: str, addrs: tuple[str, ...]) -> None:
        self.tell("transport", ExchangeGossip(node_id=node_id, addrs=addrs, gossip=self._gossip()))

    def _dial_due(self, now: float) -> None:
        for node_id, addrs in self.view.due_candidates(now):
            self.view.candidate_attempted(node_id, now, DIAL_BACKOFF_S * 5)
            self._exchange(node_id, addrs)

    def _set_own(self, updated: PeerAnnouncement) -> None:
        """Adopt a changed own announcement as the next version, signed (other nodes check it), and
        offer it to the transport."""
        self.own = sign_announcement(replace(updated, version=self.own.version + 1), self.signer)
        self._push_snapshot()

    def _log_refused(self, sender: str, change: Change) -> None:
        for ann, reason in change.refused:
            key = (sender, ann.node_id)
            if key in self.refusals_logged:
                continue
            if len(self.refusals_logged) >= REFUSALS_LOGGED:
                self.refusals_unlogged += 1
                if self.refusals_unlogged == 1:
                    self.log.warning("gossip.refused_unlogged", sender=sender, limit=REFUSALS_LOGGED)
                continue
            self.refusals_logged.add(key)
            self.log.warning(
                "gossip.refused",
                sender=sender,
                peer=ann.node_id,
                peer_name=ann.name,
                incarnation=ann.incarnation,
                version=ann.version,
                reason=reason,
            )

    def _apply(self, change: Change, now: float) -> None:
        for ann in change.joined:
            self.log.info(
                "peer.joined",
                peer=ann.node_id,
                peer_name=ann.name,
                addrs=list(ann.addrs),
                promoted_for=list(ann.promoted_for),
            )
            self._publish(PeerJoined(peer=ann))
        for ann in change.updated:
            self.log.info("peer.updated", peer=ann.node_id, peer_name=ann.name, serving=list(ann.serving))
            self._publish(PeerUpdated(peer=ann))
        if change.joined or change.updated:
            self._push_snapshot()
        if change.joined:
            # Spread news of a newcomer at once instead of waiting for the next round.
            joined = {a.node_id for a in change.joined}
            others = [(n, a) for n, a in self.view.peers.items() if n not in joined]
            for node_id, ann in random.sample(others, min(GOSSIP_FANOUT, len(others))):
                self._exchange(node_id, ann.addrs)
        if change.new_candidates:
            self._dial_due(now)

    # -- handlers -----------------------------------------------------------------------------------------

    @handles(Subscribe)
    def on_subscribe(self, msg: Subscribe) -> None:
        if msg.subscriber not in self.subscribers:
            self.subscribers.append(msg.subscriber)
        for ann in self.view.peers.values():  # bring a late subscriber up to date
            self.tell(msg.subscriber, PeerJoined(peer=ann))

    @handles(JoinMesh)
    def on_join(self, msg: JoinMesh) -> None:
        for seed in msg.seeds:
            self.view.add_seed(seed.node_id, seed.addrs)
        self._dial_due(time.monotonic())

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        if msg.name == "gpus":
            self._refresh_gpus()
            return
        now = time.monotonic()
        self.view.expire(now)
        peers = list(self.view.peers.items())
        for node_id, ann in random.sample(peers, min(GOSSIP_FANOUT, len(peers))):
            self._exchange(node_id, ann.addrs)
        self._dial_due(now)
        for node_id, addrs in self.view.due_graves(now, GRAVE_REDIAL_S):
            self._exchange(node_id, addrs)

    @handles(GossipReceived)
    def on_gossip(self, msg: GossipReceived) -> None:
        now = time.monotonic()
        change = self.view.merge_direct(msg.peer_id, msg.announcements, now)
        self._log_refused(msg.peer_id, change)
        self._apply(change, now)

    @handles(GossipFailed)
    def on_gossip_failed(self, msg: GossipFailed) -> None:
        now = time.monotonic()
        cand = self.view.candidates.get(msg.node_id)
        if cand is not None:
            event = "mesh.join_failed" if cand.seed else "peer.unreachable"
            self.log.warning(event, peer=msg.node_id, addrs=list(msg.addrs), reason=msg.reason)
            self.view.candidate_failed(msg.node_id, now, DIAL_BACKOFF_S, DIAL_BACKOFF_MAX_S)
        # An active peer failing one exchange is the heartbeat's business, not ours.

    @handles(DeclareDead)
    def on_declare_dead(self, msg: DeclareDead) -> None:
        ann = self.view.peers.get(msg.node_id)
        if ann is None:
            return
        self.view.bury(msg.node_id, ann.incarnation, time.monotonic())
        self.log.warning("peer.died", peer=msg.node_id, peer_name=ann.name, reason=msg.reason)
        self._publish(PeerDied(node_id=msg.node_id, incarnation=ann.incarnation, reason=msg.reason))
        self._push_snapshot()
        # A death taken from another member's notice is not told to the members again, but our passive
        # connections hear of deaths only from us (with the routing table, so that they need not ask).
        notice = PeerDown(node_id=msg.node_id, incarnation=ann.incarnation, reporter=self.own.node_id)
        self.tell("transport", BroadcastPeerDown(notice=notice, members=msg.broadcast, served=ann.serving))

    @handles(PeerDownReceived)
    def on_peer_down(self, msg: PeerDownReceived) -> None:
        notice = msg.notice
        if notice.node_id == self.own.node_id:
            self.log.warning("mesh.reported_dead", reporter=notice.reporter)
            return
        known = self.view.peers.get(notice.node_id)
        if known is not None:
            if known.incarnation <= notice.incarnation:
                self.tell("heartbeat", DeathReported(notice=notice))  # it decides, from its own probes
            return
        # Not an active peer of ours: remember the death so stale gossip cannot bring it back.
        self.view.bury(notice.node_id, notice.incarnation, time.monotonic())

    @handles(PeerLeavingReceived)
    def on_leaving(self, msg: PeerLeavingReceived) -> None:
        removed = self.view.bury(msg.notice.node_id, msg.notice.incarnation, time.monotonic(), left=True)
        if removed is None:
            return
        self.log.info("peer.left", peer=removed.node_id, peer_name=removed.name)
        self._publish(PeerLeft(node_id=removed.node_id, incarnation=removed.incarnation))
        self._push_snapshot()

    @handles(ConnectionLost)
    def on_connection_lost(self, msg: ConnectionLost) -> None:
        pass  # liveness is decided by the heartbeat's probes

    @handles(SetLocalAnnouncement)
    def on_set_local(self, msg: SetLocalAnnouncement) -> None:
        updated = replace(
            self.own,
            models=msg.models,
            serving=msg.serving,
            vram_bytes=msg.vram_bytes,
            rpc_ready=msg.rpc_ready,
            stuck=msg.stuck,
            model_bytes=dict(msg.model_bytes),
            model_context=dict(msg.model_context),
        )
        if updated == self.own:
            return
        self._set_own(updated)
        for node_id, ann in self.view.peers.items():
            self._exchange(node_id, ann.addrs)

    def _refresh_gpus(self) -> None:
        """Announce the GPUs' free memory again when it has moved enough to show on a bar."""
        assert self.gpus_now is not None
        now = self.gpus_now()
        if gpus_moved(self.own.gpus, now):
            self._set_own(replace(self.own, gpus=now))

    @handles(SetDemand)
    def on_demand(self, msg: SetDemand) -> None:
        """This node's request counts travel in its announcement (standbys promote on them)."""
        if msg.demand == self.own.demand:
            return
        self._set_own(replace(self.own, demand=dict(msg.demand)))

    @handles(GetStatus)
    def on_status(self, msg: GetStatus) -> StatusReply:
        now = time.monotonic()
        peers = tuple(
            PeerStatus(
                node_id=a.node_id,
                name=a.name,
                role=a.role,
                vram_bytes=a.vram_bytes,
                models=a.models,
                serving=a.serving,
                last_seen_s=round(now - self.view.last_seen.get(a.node_id, now), 3),
                addrs=a.addrs,
                model_bytes=a.model_bytes,
                gpus=a.gpus,
            )
            for a in self.view.peers.values()
        )
        return StatusReply(
            node_id=self.own.node_id,
            name=self.own.name,
            role=self.own.role,
            vram_bytes=self.own.vram_bytes,
            peers=peers,
            dead=tuple(self.view.dead),
        )
