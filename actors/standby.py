"""Standby actor: owns a standby node's readiness to take over - what it could serve, the gap it is
about to take - and, once promoted, whether it is still needed.

On a standby (passive) node it follows the passive router's table and its death and leave notices.
When a model loses its last host, or an active node wants a model nobody serves, it runs the pure
:func:`~meshllm.promotion.pick_model_assignment`, waits its :func:`~meshllm.promotion.promotion_delay`
(so that one standby in the common case takes each gap), looks at a fresh table, and, if the gap is
still open and unclaimed, promotes: ``standby.promoting``, then the node restarts itself as an active
member with the same identity serving that model (the ``promote`` callback of its owner, the Node).

On a promoted node it follows the registry: when the model's own host is back, or another promoted
node wins the race for it (:func:`~meshllm.promotion.keeps_promotion`), for ``demote_after_s`` on end,
it steps back to standby (``standby.demoted``). A promotion is never undone sooner than that, and a
demoted node does not promote again for the same model within it, so nothing flaps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.models.fit import model_need
from meshllm.models.gguf_shape import shape_of_file
from meshllm.models.hub import Hub, HubError
from meshllm.models.refs import HubRef
from meshllm.promotion import (
    Offer,
    demand_gaps,
    demand_needs,
    gaps_in,
    keeps_promotion,
    pick_model_assignment,
    promotion_delay,
)
from meshllm.serving.gguf_layout import GGUFError
from meshllm.wire.messages import (
    GetStandby,
    HostsLost,
    ModelDescribed,
    ModelFetched,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    RefreshNow,
    RoutesChanged,
    RouteTable,
    Seed,
    SetDemand,
    StandbyReply,
    Subscribe,
    Tick,
)

TICK_S = 0.2
CONFIRM_S = 0.25

Callback = Callable[[str, str, tuple[Seed, ...]], None]
"""(model, reason, active nodes to join through): the node's owner restarts it as what it becomes."""


@dataclass
class _Pending:
    model: str
    reason: str
    due: float
    refresh_asked: float = 0.0  # when it claimed the model and asked for a fresh table
    confirm_at: float = 0.0  # when to look once more (claims that crossed ours are in by then)
    confirm_asked: float = 0.0


class Standby(MsgpackActor):
    """Decides when this standby takes a gap, and when a promoted node steps back."""

    name = "standby"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        own_id: str,
        offers: tuple[Offer, ...],
        capacity_bytes: int,
        window_s: float,
        demote_after_s: float,
        promote: Callback,
        demote: Callback,
        promoted_for: str = "",
        blocked: dict[str, float] | None = None,
        promoted_reason: str = "",
        demand_ratio: float = 3.0,
        demand_min_per_min: float = 10.0,
        hub_models: tuple[tuple[str, HubRef], ...] = (),
        hub: Hub | None = None,
        context: int = 0,
    ) -> None:
        super().__init__(directory, logger)
        self.own_id = own_id
        self.offers = offers
        self.capacity = capacity_bytes
        self.window_s = window_s
        self.demote_after_s = demote_after_s
        self.promote = promote
        self.demote = demote
        self.promoted_for = promoted_for
        self.promoted_reason = promoted_reason
        self.demand_ratio = demand_ratio
        self.demand_min = demand_min_per_min
        self.own_demand: dict[str, float] = {}
        self.blocked = dict(blocked or {})  # model -> monotonic time before which it is not taken again
        self.table: RouteTable | None = None
        self.lost: dict[str, str] = {}
        self.yielded: dict[str, float] = {}  # model -> until when another standby's claim is left alone
        self.was_served: dict[str, set[str]] = {}  # model -> its hosts in the last fresh table
        self.hub_models, self.hub, self.context = hub_models, hub, context
        self.pending: _Pending | None = None
        self.told_cannot_fit: set[str] = set()
        self.done = False
        self.started = time.monotonic()
        self.peers: dict[str, PeerAnnouncement] = {}
        self.unneeded_since: float | None = None

    def on_start(self) -> None:
        self.tell("registry" if self.promoted_for else "router", Subscribe(subscriber=self.name))
        self.every(TICK_S, "standby")
        if not self.promoted_for and self.hub is not None and self.hub_models:
            threading.Thread(target=self._learn_hub_offers, name="standby-hub", daemon=True).start()

    def _learn_hub_offers(self) -> None:
        """What each hub model would need here: from the cache when it is there (on disk), else from
        the hub's metadata (fetched only if this standby promotes for it). Runs on its own thread."""
        assert self.hub is not None
        tell = self.teller()
        for name, ref in self.hub_models:
            try:
                files = self.hub.cached_files(ref)
                if files:
                    shape = shape_of_file(files[0])
                    size = sum(p.stat().st_size for p in files)
                    tell(
                        ModelFetched(
                            model=name,
                            path=str(files[0]),
                            size_bytes=size,
                            kv_bytes=shape.kv_cache_bytes(self.context),
                        )
                    )
                    continue
                remote = self.hub.describe(ref)
                kv = remote.shape.kv_cache_bytes(self.context) if remote.shape is not None else 0
                tell(ModelDescribed(model=name, size_bytes=remote.size_bytes, kv_bytes=kv))
            except (HubError, GGUFError, OSError) as exc:
                tell(ModelDescribed(model=name, size_bytes=0, kv_bytes=0, error=str(exc)))

    @handles(ModelFetched)
    def on_cached(self, msg: ModelFetched) -> None:
        self.offers += (Offer(msg.model, model_need(msg.size_bytes, msg.kv_bytes), on_disk=True),)

    @handles(ModelDescribed)
    def on_described(self, msg: ModelDescribed) -> None:
        if msg.error:
            self.log.warning("standby.cannot_offer", model=msg.model, reason=msg.error)
            return
        self.offers += (Offer(msg.model, model_need(msg.size_bytes, msg.kv_bytes), on_disk=False),)

    # -- standby: taking a gap -------------------------------------------------------------------------

    @handles(HostsLost)
    def on_hosts_lost(self, msg: HostsLost) -> None:
        for model in msg.models:
            self.lost[model] = msg.reason

    @handles(RoutesChanged)
    def on_routes(self, msg: RoutesChanged) -> None:
        self.table = msg.table
        served = {m.name for m in msg.table.models if m.hosts}
        for model in served:
            self.lost.pop(model, None)
        if msg.fresh:
            # Hosts that vanished without a notice reaching us (one lost on the way): a model whose
            # hosts in the last fresh table are no longer active nodes at all is lost too. (A host that
            # is still there but restarting its llama-server is not; if it gives up, it says "stuck".)
            actives = {s.node_id for s in msg.table.actives}
            for model, hosts in self.was_served.items():
                if model not in served and not hosts & actives:
                    self.lost.setdefault(model, "gap")
            self.was_served = {m.name: {h.node_id for h in m.hosts} for m in msg.table.models if m.hosts}
        offered, claimed = {o.name for o in self.offers}, set(msg.table.claimed)
        gaps = gaps_in(offered, served, set(msg.table.stuck), claimed, self.lost)
        host_counts = {m.name: len(m.hosts) for m in msg.table.models}
        nodes = len(msg.table.actives) + 1
        gaps += demand_gaps(
            offered - claimed, host_counts, msg.table.demand, nodes, self.demand_ratio, self.demand_min
        )
        now = time.monotonic()
        for gap in gaps:
            offer = next(o for o in self.offers if o.name == gap.name)
            if offer.need_bytes > self.capacity and gap.name not in self.told_cannot_fit:
                self.told_cannot_fit.add(gap.name)
                self.log.warning(
                    "standby.cannot_fit",
                    model=gap.name,
                    reason=gap.reason,
                    needed_bytes=offer.need_bytes,
                    available_bytes=self.capacity,
                )
        offers = tuple(
            o
            for o in self.offers
            if self.blocked.get(o.name, 0.0) <= now and self.yielded.get(o.name, 0.0) <= now
        )
        choice = pick_model_assignment(offers, self.capacity, gaps)
        if choice is None:
            if self.pending is not None:
                self.log.info(
                    "standby.stood_down", model=self.pending.model, reason="the gap was filled or claimed"
                )
            self.pending = None
            return
        offer, gap = choice
        pending = self.pending
        if pending is None or pending.model != offer.name:
            delay = promotion_delay(offer.name, self.own_id, self.capacity, self.window_s)
            self.pending = _Pending(offer.name, gap.reason, now + delay)
            return
        # A model first seen as a gap for its demand may be reported lost a moment later (its host's
        # death notice came after a table without it): it is then taken for the lost host.
        pending.reason = gap.reason
        if msg.fresh and pending.refresh_asked and not self.done:
            # Claims are ranked by delay: the standby that looked first claimed first.
            mine = (promotion_delay(pending.model, self.own_id, self.capacity, self.window_s), self.own_id)
            first = [
                c
                for c in msg.table.claims
                if c.model == pending.model and c.node_id != self.own_id and (c.key, c.node_id) < mine
            ]
            if first:
                self.log.info(
                    "standby.stood_down",
                    model=pending.model,
                    reason=f"{first[0].node_id[:12]} claimed it first",
                )
                self.yielded[pending.model] = now + 3 * self.window_s
                self.pending = None
                return
            if not pending.confirm_asked:
                # Two claims can cross on the wire: one more look a moment later sees both, and the
                # standby that claimed second stands down.
                pending.confirm_at = pending.confirm_at or now + CONFIRM_S
                return
            self.done = True
            self.log.info("standby.promoting", model=pending.model, reason=pending.reason)
            self.promote(pending.model, pending.reason, msg.table.actives)

    # -- promoted: still needed? ---------------------------------------------------------------------

    def _follow(self, ann: PeerAnnouncement) -> None:
        self.peers[ann.node_id] = ann

    @handles(PeerJoined)
    def on_joined(self, msg: PeerJoined) -> None:
        self._follow(msg.peer)

    @handles(PeerUpdated)
    def on_updated(self, msg: PeerUpdated) -> None:
        self._follow(msg.peer)

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        self.peers.pop(msg.node_id, None)

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        self.peers.pop(msg.node_id, None)

    def _check_needed(self, now: float) -> None:
        model = self.promoted_for
        hosts = {
            a.node_id: (a.vram_bytes, model in a.promoted_for)
            for a in self.peers.values()
            if model in a.serving
        }
        demand = self.own_demand.get(model, 0.0) + sum(a.demand.get(model, 0.0) for a in self.peers.values())
        busy = self.promoted_reason == "demand" and demand_needs(demand, len(hosts) + 1, self.demand_min)
        if busy or keeps_promotion(model, self.own_id, self.capacity, hosts):
            self.unneeded_since = None
            return
        if self.unneeded_since is None:
            self.unneeded_since = now
            self.log.info("standby.unneeded", model=model, hosts=sorted(hosts))
        quiet = now - self.unneeded_since >= self.demote_after_s
        if quiet and now - self.started >= self.demote_after_s and not self.done:
            self.done = True
            why = "demand fell" if self.promoted_reason == "demand" else "another node serves it"
            self.log.info("standby.demoted", model=model, reason=why, hosts=sorted(hosts))
            self.demote(model, "unneeded", ())

    # -- both ---------------------------------------------------------------------------------------------

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        now = time.monotonic()
        if self.promoted_for:
            self._check_needed(now)
            return
        pending = self.pending
        if pending is not None and now >= pending.due and not pending.refresh_asked:
            pending.refresh_asked = now
            key = promotion_delay(pending.model, self.own_id, self.capacity, self.window_s)
            self.tell("router", RefreshNow(claim=pending.model, claim_key=key))  # a fresh look, and a claim
        elif (
            pending is not None
            and pending.confirm_at
            and now >= pending.confirm_at
            and not pending.confirm_asked
        ):
            pending.confirm_asked = now
            key = promotion_delay(pending.model, self.own_id, self.capacity, self.window_s)
            self.tell("router", RefreshNow(claim=pending.model, claim_key=key))

    @handles(SetDemand)
    def on_demand(self, msg: SetDemand) -> None:
        self.own_demand = dict(msg.demand)

    @handles(GetStandby)
    def on_get(self, msg: GetStandby) -> StandbyReply:
        return StandbyReply(
            offers=tuple(o.name for o in self.offers),
            capacity_bytes=self.capacity,
            pending=self.pending.model if self.pending else "",
            pending_reason=self.pending.reason if self.pending else "",
            promoted_for=self.promoted_for,
        )
