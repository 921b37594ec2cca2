"""Router actor: owns the routing table a gateway consults - which nodes serve which model, and the
loopback port of this node's own llama-server per model.

On an active node it follows the registry's topology events (peers announce what they serve) and the
election's LocalServing messages. It answers Route and ListModels; it never tells anyone anything.
"""

from __future__ import annotations

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.wire.messages import (
    HostFailed,
    HostInfo,
    ListModels,
    LocalServing,
    ModelList,
    ModelRoute,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    Route,
    RouteReply,
    RouteSnapshot,
    RouteTable,
    Seed,
    Subscribe,
)


class Router(MsgpackActor):
    """Answers "where can model M be served?" from the active mesh's announcements."""

    name = "router"

    def __init__(
        self, directory: Directory, logger: Logger, own: HostInfo, own_models: tuple[str, ...]
    ) -> None:
        super().__init__(directory, logger)
        self.own = own
        self.own_models = own_models
        self.peers: dict[str, PeerAnnouncement] = {}
        self.local_ports: dict[str, int] = {}
        self.local_rpc_ports: dict[str, int] = {}

    def on_start(self) -> None:
        self.tell("registry", Subscribe(subscriber=self.name))
        self._push_table()

    def _push_table(self) -> None:
        """Keep the transport's answer to passive nodes' route requests current."""
        models = []
        for name in sorted(self._served()):
            hosts = [self.own] if name in self.local_ports else []
            hosts += [
                HostInfo(node_id=a.node_id, addrs=a.addrs, vram_bytes=a.vram_bytes)
                for a in sorted(self.peers.values(), key=lambda a: a.node_id)
                if name in a.serving
            ]
            models.append(ModelRoute(name=name, hosts=tuple(hosts)))
        actives = (
            Seed(self.own.node_id, self.own.addrs),
            *(Seed(a.node_id, a.addrs) for a in self.peers.values()),
        )
        table = RouteTable(
            models=tuple(models), unserved=tuple(sorted(self._wanted() - self._served())), actives=actives
        )
        self.tell("transport", RouteSnapshot(table=table))

    @handles(PeerJoined)
    def on_joined(self, msg: PeerJoined) -> None:
        self.peers[msg.peer.node_id] = msg.peer
        self._push_table()

    @handles(PeerUpdated)
    def on_updated(self, msg: PeerUpdated) -> None:
        self.peers[msg.peer.node_id] = msg.peer
        self._push_table()

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        self.peers.pop(msg.node_id, None)
        self._push_table()

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        self.peers.pop(msg.node_id, None)
        self._push_table()

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
        self._push_table()

    def _served(self) -> set[str]:
        served = set(self.local_ports)
        for ann in self.peers.values():
            served.update(ann.serving)
        return served

    def _wanted(self) -> set[str]:
        wanted = set(self.own_models)
        for ann in self.peers.values():
            wanted.update(ann.models)
        return wanted

    @handles(Route)
    def on_route(self, msg: Route) -> RouteReply:
        hosts = tuple(
            HostInfo(node_id=a.node_id, addrs=a.addrs, vram_bytes=a.vram_bytes)
            for a in sorted(self.peers.values(), key=lambda a: a.node_id)
            if msg.model in a.serving
        )
        available = self._served() | self._wanted()
        return RouteReply(
            model=msg.model,
            known=msg.model in available,
            local_port=self.local_ports.get(msg.model, 0),
            hosts=hosts,
            available=tuple(sorted(available)),
            local_rpc_port=self.local_rpc_ports.get(msg.model, 0),
        )

    @handles(ListModels)
    def on_list(self, msg: ListModels) -> ModelList:
        return ModelList(served=tuple(sorted(self._served())), wanted=tuple(sorted(self._wanted())))
