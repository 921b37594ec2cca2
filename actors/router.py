"""Router actor: owns the routing table a gateway consults - which nodes serve which model, and the
loopback port of this node's own llama-server per model.

On an active node it follows the registry's topology events (peers announce what they serve) and the
election's LocalServing messages. It answers Route and ListModels; it never tells anyone anything.
"""

from __future__ import annotations

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.messages import (
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
    Subscribe,
)


class Router(MsgpackActor):
    """Answers "where can model M be served?" from the active mesh's announcements."""

    name = "router"

    def __init__(self, directory: Directory, logger: Logger, own_models: tuple[str, ...]) -> None:
        super().__init__(directory, logger)
        self.own_models = own_models
        self.peers: dict[str, PeerAnnouncement] = {}
        self.local_ports: dict[str, int] = {}
        self.local_rpc_ports: dict[str, int] = {}

    def on_start(self) -> None:
        self.tell("registry", Subscribe(subscriber=self.name))

    @handles(PeerJoined)
    def on_joined(self, msg: PeerJoined) -> None:
        self.peers[msg.peer.node_id] = msg.peer

    @handles(PeerUpdated)
    def on_updated(self, msg: PeerUpdated) -> None:
        self.peers[msg.peer.node_id] = msg.peer

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        self.peers.pop(msg.node_id, None)

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        self.peers.pop(msg.node_id, None)

    @handles(LocalServing)
    def on_local(self, msg: LocalServing) -> None:
        ports = self.local_rpc_ports if msg.kind == "rpc-server" else self.local_ports
        if msg.port:
            ports[msg.model] = msg.port
        else:
            ports.pop(msg.model, None)

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
