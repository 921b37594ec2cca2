"""PassiveRouter actor: a passive node's (client or standby) routing table, fetched from active nodes
instead of learned by gossip.

It asks an active node for the table at start, refreshes it every 30-60 s (jittered, so a thousand
clients do not ask in step), at once when a tunnel to a host fails, and early when asked for a model
it has no host for or for the model list while a wanted model is still coming up. Host choice is rendezvous
hashing of (this node, model) over the model's hosts: clients spread out and each keeps its host.
Death and leaving notices pushed down its connections are applied to the cached table: an active
node sends its own table with them, which is taken as a refresh; from an older node, which sends
none, the host is dropped and the table refreshed within a couple of seconds.
"""

from __future__ import annotations

import random
import time

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.placement import rank_hosts
from meshllm.routing import available, drop_host, hosted_by, hostless, hosts_of, model_list
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    GetPlan,
    GetRouteTable,
    GetStatus,
    HostFailed,
    HostsLost,
    ListModels,
    ModelList,
    ModelStatus,
    PeerDownReceived,
    PeerLeavingReceived,
    PlanReply,
    RefreshNow,
    RefreshRoutes,
    Route,
    RouteReply,
    RoutesChanged,
    RoutesFailed,
    RoutesReceived,
    RouteTable,
    Seed,
    StatusReply,
    Subscribe,
    Tick,
)

RETRY_S = (1.0, 2.0, 5.0, 10.0)
NOTICE_SPREAD_S = 2.0
EAGER_REFRESH_S = 2.0
"""A request for a model with no known host, or a model list while a wanted model is still coming up,
refreshes the table, at most this often."""


class PassiveRouter(MsgpackActor):
    """Keeps a cached routing table fresh and answers the gateway from it."""

    name = "router"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        own_id: str,
        own_name: str,
        role: str,
        seeds: tuple[Seed, ...],
        refresh_s: float,
    ) -> None:
        super().__init__(directory, logger)
        self.own_id = own_id
        self.own_name = own_name
        self.role = role
        self.seeds = seeds
        self.refresh_s = refresh_s
        self.table = RouteTable(models=(), unserved=(), actives=())
        self.next_refresh = 0.0
        self.in_flight_since: float | None = None
        self.failures = 0
        self.refreshed = False
        self.last_refresh = 0.0
        self.subscribers: list[str] = []
        self.claim: tuple[str, float] = ("", 0.0)  # sent with the next refresh (a standby's)
        self.asked: dict[str, int] = {}  # requests for models with no host, told at the next refresh

    def on_start(self) -> None:
        self.every(1.0, "refresh", first_after=0.0)

    def _actives(self) -> tuple[Seed, ...]:
        known = {s.node_id: s for s in self.seeds}
        known.update({s.node_id: s for s in self.table.actives})
        return tuple(known.values())

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        now = time.monotonic()
        if self.in_flight_since is not None and now - self.in_flight_since < 30:
            return
        if now >= self.next_refresh:
            self.in_flight_since = now
            claim, key = self.claim
            self.claim = ("", 0.0)
            asked, self.asked = self.asked, {}
            refresh = RefreshRoutes(
                actives=self._actives(), every=self.role == "standby", claim=claim, claim_key=key, asked=asked
            )
            self.tell("transport", refresh)

    def _refresh_soon(self, spread_s: float = 0.0) -> None:
        """Refresh now, or within ``spread_s``: a death notice reaches every passive node at once, and
        a thousand refreshes in the same instant is a burst the active nodes need not take."""
        self.next_refresh = min(self.next_refresh, time.monotonic() + random.uniform(0, spread_s))

    @handles(Subscribe)
    def on_subscribe(self, msg: Subscribe) -> None:
        if msg.subscriber not in self.subscribers:
            self.subscribers.append(msg.subscriber)
        if self.refreshed:
            self.tell(msg.subscriber, RoutesChanged(table=self.table))

    def _publish(self, event: Message) -> None:
        for name in self.subscribers:
            self.tell(name, event)

    @handles(GetRouteTable)
    def on_get_table(self, msg: GetRouteTable) -> RouteTable:
        return self.table

    @handles(RefreshNow)
    def on_refresh_now(self, msg: RefreshNow) -> None:
        self.claim = (msg.claim, msg.claim_key)
        self._refresh_soon()
        self.on_tick(Tick("refresh"))  # now, not at the next tick

    @handles(RoutesReceived)
    def on_routes(self, msg: RoutesReceived) -> None:
        self.in_flight_since = None
        self._take(msg.table, msg.source, "routes.refreshed")
        self._publish(RoutesChanged(table=self.table))

    def _take(self, table: RouteTable, source: str, event: str) -> None:
        """A whole table from an active node (asked for, or pushed with a notice): the next refresh is
        a full interval away."""
        self.last_refresh = time.monotonic()
        self.failures = 0
        self.next_refresh = time.monotonic() + self.refresh_s * random.uniform(2 / 3, 4 / 3)
        changed = (table.models, table.unserved) != (self.table.models, self.table.unserved)
        self.table = table
        if changed or not self.refreshed:
            self.log.info(
                event,
                source=source,
                models={m.name: len(m.hosts) for m in table.models},
                unserved=list(table.unserved),
            )
        self.refreshed = True

    @handles(RoutesFailed)
    def on_failed(self, msg: RoutesFailed) -> None:
        self.in_flight_since = None
        delay = RETRY_S[min(self.failures, len(RETRY_S) - 1)]
        self.failures += 1
        self.next_refresh = time.monotonic() + delay
        self.log.warning("routes.refresh_failed", reason=msg.reason, retry_in_s=delay)

    @handles(HostFailed)
    def on_host_failed(self, msg: HostFailed) -> None:
        self.log.warning("routes.host_failed", model=msg.model, host=msg.node_id)
        self.table = drop_host(self.table, msg.node_id, msg.model)
        self._refresh_soon(NOTICE_SPREAD_S)

    @handles(PeerDownReceived)
    def on_peer_down(self, msg: PeerDownReceived) -> None:
        notice = msg.notice
        self.log.info(
            "routes.host_died", host=notice.node_id, reporter=notice.reporter, pushed=msg.routes is not None
        )
        self._host_gone(notice.node_id, "death", msg.routes, msg.from_peer)

    @handles(PeerLeavingReceived)
    def on_peer_leaving(self, msg: PeerLeavingReceived) -> None:
        self.log.info("routes.host_left", host=msg.notice.node_id, pushed=msg.routes is not None)
        self._host_gone(msg.notice.node_id, "leave", msg.routes, msg.notice.node_id)

    def _host_gone(self, node_id: str, reason: str, routes: RouteTable | None, source: str) -> None:
        """A host died or left. With the sender's table (pushed with the notice) nothing is asked of
        the active nodes; without it (an older sender) the table is refreshed within a couple of
        seconds, spread so that a thousand passive nodes do not ask at once."""
        models = hosted_by(self.table, node_id)
        if routes is not None:
            pushed = drop_host(routes, node_id)
            # The sender lists what the node served with no host left, also where our table is older
            # than that service (a host that came up since our last refresh): those are lost too.
            models += tuple(name for name in hostless(pushed) if name not in models)
            self._take(pushed, source, "routes.pushed")
        else:
            self.table = drop_host(self.table, node_id)
            self._refresh_soon(NOTICE_SPREAD_S)
        self._publish(HostsLost(node_id=node_id, reason=reason, models=models))
        # Not "fresh" even when pushed: a standby waiting for the answer to its claim waits for that.
        self._publish(RoutesChanged(table=self.table, fresh=False))

    @handles(Route)
    def on_route(self, msg: Route) -> RouteReply:
        hosts = hosts_of(self.table, msg.model)
        if not hosts:
            self.asked[msg.model] = self.asked.get(msg.model, 0) + 1
        if not hosts and time.monotonic() - self.last_refresh >= EAGER_REFRESH_S:
            self._refresh_soon()  # the table may simply be older than the host
        by_id = {h.node_id: h for h in hosts}
        ranked = tuple(by_id[n] for n in rank_hosts(self.own_id, msg.model, list(by_id)))
        names = available(self.table)
        return RouteReply(
            model=msg.model,
            known=msg.model in names,
            local_port=0,
            hosts=ranked,
            available=names,
            spread=False,
        )

    @handles(ListModels)
    def on_list(self, msg: ListModels) -> ModelList:
        coming = set(self.table.unserved) - set(self.table.stuck)
        if coming and time.monotonic() - self.last_refresh >= EAGER_REFRESH_S:
            # A model is wanted and not stuck: it is loading, and may be served by now. Someone is
            # asking (a client started with the mesh): refresh rather than list it as missing for
            # the 30-60 s until the next scheduled refresh.
            self._refresh_soon()
        return model_list(self.table)

    @handles(GetStatus)
    def on_status(self, msg: GetStatus) -> StatusReply:
        return StatusReply(node_id=self.own_id, name=self.own_name, role=self.role, vram_bytes=0, peers=())

    @handles(GetPlan)
    def on_plan(self, msg: GetPlan) -> PlanReply:
        models = [
            ModelStatus(
                name=m.name,
                state="serving" if m.hosts else "waiting",
                hosts=tuple(h.node_id for h in m.hosts),
            )
            for m in self.table.models
        ]
        models += [ModelStatus(name=n, state="waiting", hosts=()) for n in self.table.unserved]
        return PlanReply(models=tuple(sorted(models, key=lambda m: m.name)))
