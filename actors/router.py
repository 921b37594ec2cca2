"""Router actor: owns the routing table of an active node - which nodes serve which model - and the
loopback ports of this node's own llama-server and rpc-server per model.

It follows the registry's topology events (peers announce what they serve) and the election's
LocalServing messages, rebuilds the table (:func:`meshllm.routing.build_table`) when they change,
and publishes it to the transport, which answers passive nodes' route requests with it; the
snapshot it publishes also carries this node's loopback ports, so the gateway and the tunnels answer
"where is M served?" on the endpoint's loop (:func:`meshllm.routing.route_reply`) without asking. It
answers Route and ListModels from the same snapshot; it never waits on anyone.
"""

from __future__ import annotations

import time

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.routing import build_table, model_list, route_reply
from meshllm.wire.messages import (
    AskedFor,
    Claim,
    ClaimSeen,
    GetRouteTable,
    HostFailed,
    HostInfo,
    ListModels,
    LocalServing,
    ModelList,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    Route,
    RouteReply,
    RouteSnapshot,
    RouteTable,
    SetDemand,
    SetLocalAnnouncement,
    Subscribe,
)

CLAIM_TTL_S = 15.0
DEMAND_WINDOW_S = 60.0


class Router(MsgpackActor):
    """Answers "where can model M be served?" from the active mesh's announcements."""

    name = "router"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        own: HostInfo,
        own_models: tuple[str, ...],
        own_claims: tuple[str, ...] = (),
    ) -> None:
        super().__init__(directory, logger)
        self.own = own
        self.own_models = own_models
        self.own_claims = own_claims  # what this node was promoted for (it was a standby)
        self.own_demand: dict[str, float] = {}
        self.asked: list[tuple[float, str, int]] = []  # (when, model, count) from passive nodes' misses
        self.own_stuck: tuple[str, ...] = ()
        self.own_bytes: dict[str, int] = {}  # size and context of this node's models, for the table
        self.own_context: dict[str, int] = {}
        self.claims: dict[tuple[str, str], tuple[Claim, float]] = {}  # (model, node) -> (claim, expiry)
        self.peers: dict[str, PeerAnnouncement] = {}
        self.local_ports: dict[str, int] = {}
        self.local_rpc_ports: dict[str, int] = {}
        self.table = self._build()
        self.snapshot = self._snapshot()

    def on_start(self) -> None:
        self.tell("registry", Subscribe(subscriber=self.name))
        self.tell("transport", self.snapshot)

    def _snapshot(self) -> RouteSnapshot:
        return RouteSnapshot(
            table=self.table,
            own_id=self.own.node_id,
            local_ports=dict(self.local_ports),
            local_rpc_ports=dict(self.local_rpc_ports),
        )

    def _build(self) -> RouteTable:
        return build_table(
            self.own,
            self.own_models,
            self.local_ports,
            self.peers.values(),
            self.own_claims,
            self._demand(),
            self.own_stuck,
            [claim for claim, until in self.claims.values() if until > time.monotonic()],
            self.own_bytes,
            self.own_context,
        )

    def _rebuild(self) -> None:
        self.table = self._build()
        snapshot = self._snapshot()
        if snapshot != self.snapshot:  # the table, or a port the table does not show (an rpc-server)
            self.snapshot = snapshot
            self.tell("transport", snapshot)

    @handles(PeerJoined)
    def on_joined(self, msg: PeerJoined) -> None:
        self.peers[msg.peer.node_id] = msg.peer
        self._rebuild()

    @handles(PeerUpdated)
    def on_updated(self, msg: PeerUpdated) -> None:
        self.peers[msg.peer.node_id] = msg.peer
        self._rebuild()

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        self.peers.pop(msg.node_id, None)
        self._rebuild()

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        self.peers.pop(msg.node_id, None)
        self._rebuild()

    @handles(HostFailed)
    def on_host_failed(self, msg: HostFailed) -> None:
        pass  # on an active node the heartbeat decides whether a host is gone

    @handles(LocalServing)
    def on_local(self, msg: LocalServing) -> None:
        ports = self.local_rpc_ports if msg.kind == "rpc-server" else self.local_ports
        if msg.port:
            ports[msg.model] = msg.port
        else:
            ports.pop(msg.model, None)
        self._rebuild()

    @handles(SetLocalAnnouncement)
    def on_local_announcement(self, msg: SetLocalAnnouncement) -> None:
        """What this node's election says it cannot serve now, and its models' sizes and contexts
        (the rest of it the router knows)."""
        self.own_stuck = msg.stuck
        self.own_bytes, self.own_context = dict(msg.model_bytes), dict(msg.model_context)
        self._rebuild()

    @handles(ClaimSeen)
    def on_claim(self, msg: ClaimSeen) -> None:
        """A standby about to promote: its claim stays in the table a while, so the next standby
        looking at the same gap sees it was first."""
        now = time.monotonic()
        self.claims = {k: v for k, v in self.claims.items() if v[1] > now}
        self.claims[(msg.claim.model, msg.claim.node_id)] = (msg.claim, now + CLAIM_TTL_S)
        self._rebuild()

    def _demand(self) -> dict[str, float]:
        """This node's counts, plus what passive nodes asked for in the last minute and found no host."""
        cutoff = time.monotonic() - DEMAND_WINDOW_S
        self.asked = [a for a in self.asked if a[0] > cutoff]
        demand = dict(self.own_demand)
        for _, model, count in self.asked:
            demand[model] = demand.get(model, 0.0) + count
        return demand

    @handles(AskedFor)
    def on_asked(self, msg: AskedFor) -> None:
        now = time.monotonic()
        self.asked += [(now, model, count) for model, count in msg.asked.items()]
        self._rebuild()

    @handles(SetDemand)
    def on_demand(self, msg: SetDemand) -> None:
        self.own_demand = dict(msg.demand)
        self._rebuild()

    @handles(GetRouteTable)
    def on_get_table(self, msg: GetRouteTable) -> RouteTable:
        return self.table

    @handles(Route)
    def on_route(self, msg: Route) -> RouteReply:
        return route_reply(self.snapshot, msg.model)

    @handles(ListModels)
    def on_list(self, msg: ListModels) -> ModelList:
        return model_list(self.table)
