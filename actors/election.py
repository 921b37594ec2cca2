"""Election actor: owns the node's serving plan - for each model it is configured to serve, whether
it runs here solo, waits (not enough VRAM), and which llama.cpp children that needs.

It re-plans on topology events (debounced), tells the Supervisor the desired children only when the
plan changed, and turns the Supervisor's reports into the node's announcement (what it serves) and
the router's local ports. Decisions come from :mod:`meshllm.placement`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from actors.base import Directory, MsgpackActor, handles
from meshllm.catalog import ModelRef
from meshllm.logsetup import Logger
from meshllm.messages import (
    DesiredProcesses,
    GetPlan,
    LlamaFailed,
    LlamaReady,
    LlamaStopped,
    LocalServing,
    ModelStatus,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    PlanReply,
    ProcessSpec,
    SetLocalAnnouncement,
    Subscribe,
    Tick,
)
from meshllm.placement import fits_solo, needed_bytes

REPLAN_DEBOUNCE_S = 0.25


@dataclass
class LocalModel:
    ref: ModelRef
    mode: str = "waiting"  # solo | waiting
    state: str = "waiting"  # starting | ready | failed | waiting
    port: int = 0
    detail: str = ""


def server_key(model: str) -> str:
    return f"server:{model}"


class Election(MsgpackActor):
    """Plans which models this node serves and keeps the Supervisor in line with the plan."""

    name = "election"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        own_id: str,
        vram_bytes: int,
        models: tuple[ModelRef, ...],
        force_split: bool,
    ) -> None:
        super().__init__(directory, logger)
        self.own_id = own_id
        self.vram_bytes = vram_bytes
        self.force_split = force_split
        self.models = {m.name: LocalModel(ref=m) for m in models}
        self.peers: dict[str, PeerAnnouncement] = {}
        self.desired: tuple[ProcessSpec, ...] | None = None
        self.dirty = True
        self.last_change = 0.0

    def on_start(self) -> None:
        self.tell("registry", Subscribe(subscriber=self.name))
        self.every(REPLAN_DEBOUNCE_S, "replan", first_after=0.0)

    # -- topology -------------------------------------------------------------------------------------

    def _touch(self) -> None:
        self.dirty = True
        self.last_change = time.monotonic()

    @handles(PeerJoined)
    def on_joined(self, msg: PeerJoined) -> None:
        self.peers[msg.peer.node_id] = msg.peer
        self._touch()

    @handles(PeerUpdated)
    def on_updated(self, msg: PeerUpdated) -> None:
        old = self.peers.get(msg.peer.node_id)
        self.peers[msg.peer.node_id] = msg.peer
        if old is None or (old.models, old.vram_bytes) != (msg.peer.models, msg.peer.vram_bytes):
            self._touch()

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        if self.peers.pop(msg.node_id, None) is not None:
            self._touch()

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        if self.peers.pop(msg.node_id, None) is not None:
            self._touch()

    # -- planning -------------------------------------------------------------------------------------

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        if self.dirty and time.monotonic() - self.last_change >= REPLAN_DEBOUNCE_S:
            self.dirty = False
            self._replan()

    def _replan(self) -> None:
        specs: list[ProcessSpec] = []
        for name, local in self.models.items():
            if fits_solo(self.vram_bytes, local.ref.size_bytes) and not self.force_split:
                local.mode = "solo"
                local.detail = ""
                specs.append(
                    ProcessSpec(key=server_key(name), kind="llama-server", model_path=str(local.ref.path))
                )
            else:
                local.mode = "waiting"
                local.state = "waiting"
                need = needed_bytes(local.ref.size_bytes)
                local.detail = (
                    "forced split is not available yet"
                    if self.force_split
                    else f"needs {need} bytes of VRAM, this node has {self.vram_bytes}"
                )
        desired = tuple(specs)
        if desired == self.desired:
            return
        self.desired = desired
        self.log.info(
            "election.plan",
            models={n: {"mode": m.mode, "detail": m.detail} for n, m in self.models.items()},
        )
        for name, local in self.models.items():
            if local.mode == "waiting":
                self.log.warning("election.waiting", model=name, reason=local.detail)
            elif local.state == "waiting":
                local.state = "starting"
        self.tell("supervisor", DesiredProcesses(specs=desired))

    # -- supervisor reports ---------------------------------------------------------------------------

    def _model_of(self, key: str) -> LocalModel | None:
        _, _, name = key.partition(":")
        return self.models.get(name)

    def _announce(self) -> None:
        serving = tuple(sorted(n for n, m in self.models.items() if m.state == "ready"))
        self.tell(
            "registry",
            SetLocalAnnouncement(models=tuple(self.models), serving=serving, vram_bytes=self.vram_bytes),
        )

    @handles(LlamaReady)
    def on_ready(self, msg: LlamaReady) -> None:
        local = self._model_of(msg.key)
        if local is None:
            return
        local.state, local.port, local.detail = "ready", msg.port, ""
        self.tell("router", LocalServing(model=local.ref.name, port=msg.port))
        self._announce()

    @handles(LlamaFailed)
    def on_failed(self, msg: LlamaFailed) -> None:
        local = self._model_of(msg.key)
        if local is None:
            return
        local.state, local.port = "failed" if msg.retry_in_s < 0 else "starting", 0
        local.detail = msg.reason
        self.tell("router", LocalServing(model=local.ref.name, port=0))
        self._announce()

    @handles(LlamaStopped)
    def on_stopped(self, msg: LlamaStopped) -> None:
        local = self._model_of(msg.key)
        if local is None:
            return
        local.port = 0
        if local.state == "ready":
            local.state = "waiting"
        self.tell("router", LocalServing(model=local.ref.name, port=0))
        self._announce()

    # -- status -----------------------------------------------------------------------------------------

    @handles(GetPlan)
    def on_plan(self, msg: GetPlan) -> PlanReply:
        names: set[str] = set(self.models)
        for ann in self.peers.values():
            names.update(ann.models)
        out = []
        for name in sorted(names):
            hosts = [a.node_id for a in self.peers.values() if name in a.serving]
            local = self.models.get(name)
            if local is not None and local.state == "ready":
                hosts.insert(0, self.own_id)
            if local is not None:
                state = local.mode if local.state == "ready" else local.state
                size = local.ref.size_bytes
                out.append(
                    ModelStatus(
                        name=name,
                        state=state,
                        hosts=tuple(hosts),
                        size_bytes=size,
                        needed_bytes=needed_bytes(size),
                        available_bytes=self.vram_bytes,
                        detail=local.detail,
                    )
                )
            else:
                out.append(
                    ModelStatus(name=name, state="serving" if hosts else "waiting", hosts=tuple(hosts))
                )
        return PlanReply(models=tuple(out))
