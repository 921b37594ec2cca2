"""Election actor: owns the node's serving plan - for each model it is configured to serve, whether
it runs here solo, hosts a tensor split, lends its memory as a split worker, stands by, or waits
for more VRAM - and the llama.cpp children that needs.

It re-plans on topology events (debounced) and tells the Supervisor the desired children only when
the plan changed, so an unchanged set of workers and fractions never restarts anything. It turns
the Supervisor's reports into the node's announcement (what it serves, which rpc-servers are up)
and the router's local ports. Every node computes the same plan from the same view: decisions come
from the pure functions in :mod:`meshllm.placement`; how each child is spelled comes from
:mod:`meshllm.serving.process_specs`.

It never waits on another actor: a split host's tunnel listeners are asked of the transport with
``EnsureRpcListeners`` and arrive later as an ``RpcListeners`` message, which triggers a re-plan.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import pykka

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.models.catalog import ModelRef
from meshllm.placement import Candidate, Shortfall, SplitPlan, fits_solo, needed_bytes, plan_split
from meshllm.serving.cache_fill import fill_in_background
from meshllm.serving.process_specs import parse_key, rpc_spec, server_spec, split_server_spec
from meshllm.wire.codec import encode
from meshllm.wire.messages import (
    DesiredProcesses,
    EnsureRpcListeners,
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
    RpcCacheFilled,
    RpcListeners,
    RpcTunnelFailed,
    Seed,
    SetLocalAnnouncement,
    Subscribe,
    Tick,
)

REPLAN_DEBOUNCE_S = 0.25
SUSPECT_S = 10.0
"""A worker whose RPC tunnel failed is left out of plans this long (no crash loop against it)."""


@dataclass
class LocalModel:
    ref: ModelRef
    mode: str = "waiting"  # solo | split | worker | standby | waiting
    server: str = "down"  # llama-server: down | starting | ready | failed
    rpc: str = "down"  # rpc-server: down | starting | ready | failed
    port: int = 0
    rpc_port: int = 0
    plan: SplitPlan | None = None
    shortfall: Shortfall | None = None
    detail: str = ""
    listening: dict[str, int] = field(default_factory=dict)  # tunnel listener port per worker
    listeners_asked: tuple[str, ...] = ()  # workers we asked the transport listeners for
    cache: str = "empty"  # rpc tensor cache: empty | filling | filled


class Election(MsgpackActor):
    """Plans which models this node serves, and how, and keeps the Supervisor in line with the plan."""

    name = "election"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        own_id: str,
        vram_bytes: int,
        models: tuple[ModelRef, ...],
        force_split: bool,
        cache_dir: Path | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__(directory, logger)
        self.cache_dir = cache_dir
        self.threads = threads
        self.own_id = own_id
        self.vram_bytes = vram_bytes
        self.force_split = force_split
        self.models = {m.name: LocalModel(ref=m) for m in models}
        self.peers: dict[str, PeerAnnouncement] = {}
        self.suspects: dict[str, float] = {}
        self.desired: tuple[ProcessSpec, ...] | None = None
        self.logged_plan: dict[str, tuple[object, ...]] = {}
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
        relevant = ("models", "vram_bytes", "rpc_ready", "force_split")
        if old is None or any(getattr(old, f) != getattr(msg.peer, f) for f in relevant):
            self._touch()

    @handles(PeerDied)
    def on_died(self, msg: PeerDied) -> None:
        if self.peers.pop(msg.node_id, None) is not None:
            self._touch()

    @handles(PeerLeft)
    def on_left(self, msg: PeerLeft) -> None:
        if self.peers.pop(msg.node_id, None) is not None:
            self._touch()

    @handles(RpcTunnelFailed)
    def on_tunnel_failed(self, msg: RpcTunnelFailed) -> None:
        if msg.worker not in self.suspects:
            self.log.warning(
                "election.worker_unreachable", model=msg.model, worker=msg.worker, reason=msg.reason
            )
        self.suspects[msg.worker] = time.monotonic() + SUSPECT_S
        self._touch()

    # -- planning -------------------------------------------------------------------------------------

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        now = time.monotonic()
        expired = [n for n, until in self.suspects.items() if until <= now]
        for node_id in expired:
            del self.suspects[node_id]
        if expired:
            self._touch()
        if self.dirty and now - self.last_change >= REPLAN_DEBOUNCE_S:
            self.dirty = False
            self._replan()

    def _candidates(self, model: str) -> tuple[list[Candidate], bool]:
        wanting = [p for p in self.peers.values() if model in p.models and p.role == "active"]
        force = self.force_split or any(p.force_split for p in wanting)
        cands = [Candidate(self.own_id, self.vram_bytes)]
        cands += [Candidate(p.node_id, p.vram_bytes) for p in wanting if p.node_id not in self.suspects]
        return cands, force

    def _rpc_spec(self, local: LocalModel) -> list[ProcessSpec]:
        """This node's rpc-server for a model, once its tensor cache is filled from the local GGUF
        (so the host sends only what the cache lacks). The fill runs off the actor thread."""
        name = local.ref.name
        if self.cache_dir is None:
            return [rpc_spec(name, self.threads)]
        if local.cache == "empty":
            local.cache = "filling"
            me = self.actor_ref

            def report(msg: RpcCacheFilled) -> None:
                with contextlib.suppress(pykka.ActorDeadError):
                    me.tell(encode(msg))

            fill_in_background(local.ref, self.cache_dir, report)
        if local.cache != "filled":
            return []
        return [rpc_spec(name, None, self.cache_dir)]

    @handles(RpcCacheFilled)
    def on_cache_filled(self, msg: RpcCacheFilled) -> None:
        local = self.models.get(msg.model)
        if local is None:
            return
        local.cache = "filled"
        if msg.error:
            self.log.warning("rpc.cache_fill_failed", model=msg.model, reason=msg.error)
        else:
            self.log.info(
                "rpc.cache_filled", model=msg.model, files=msg.files, bytes_written=msg.bytes_written
            )
        self._touch()

    def _plan_model(self, local: LocalModel) -> list[ProcessSpec]:
        name, size = local.ref.name, local.ref.size_bytes
        cands, force = self._candidates(name)
        local.plan, local.shortfall, local.detail = None, None, ""
        if not force and fits_solo(self.vram_bytes, size):
            local.mode = "solo"
            return [server_spec(local.ref, self.threads)]
        plan = plan_split(cands, size, force)
        if isinstance(plan, Shortfall):
            local.mode, local.shortfall = "waiting", plan
            local.detail = f"needs {plan.needed_bytes} bytes of VRAM, the group has {plan.available_bytes}"
            return []
        local.plan = plan
        if plan.host != self.own_id:
            local.mode = "worker" if self.own_id in plan.workers else "standby"
            return [rpc_spec(name, None)] if local.mode == "worker" else []
        if not plan.workers:  # forced, but nobody to split with
            local.mode = "solo"
            local.detail = "split forced but no other node serves this model"
            return [server_spec(local.ref, self.threads)]
        local.mode = "split"
        specs = self._rpc_spec(local)
        not_ready = [w for w in plan.workers if name not in self.peers[w].rpc_ready]
        if local.rpc != "ready" or not_ready:
            local.detail = "waiting for rpc-servers: " + ", ".join(
                (["this node"] if local.rpc != "ready" else []) + [w[:12] for w in not_ready]
            )
            return specs
        if set(local.listening) != set(plan.workers):
            self._ask_listeners(local, plan.workers)
            local.detail = "opening RPC tunnel listeners"
            return specs
        ports = [local.rpc_port] + [local.listening[w] for w in plan.workers]
        specs.append(split_server_spec(local.ref, self.threads, ports, plan.fractions))
        return specs

    def _ask_listeners(self, local: LocalModel, workers: tuple[str, ...]) -> None:
        """Ask the transport for tunnel listeners to these workers (empty: close them); the answer
        comes back as RpcListeners. Asked once per set of workers, not on every re-plan."""
        if local.listeners_asked == workers:
            return
        local.listeners_asked = workers
        local.listening = {}
        seeds = tuple(Seed(node_id=w, addrs=self.peers[w].addrs) for w in workers)
        self.tell("transport", EnsureRpcListeners(model=local.ref.name, workers=seeds))

    @handles(RpcListeners)
    def on_listeners(self, msg: RpcListeners) -> None:
        local = self.models.get(msg.model)
        if local is None or not local.listeners_asked:
            return  # the answer to a close
        if msg.error:
            self.log.warning("rpc.listeners_failed", model=msg.model, reason=msg.error)
            local.listeners_asked = ()  # asked again on the next re-plan
        elif set(msg.ports) != set(local.listeners_asked):
            return  # the answer to an older request
        else:
            local.listening = dict(msg.ports)
        self._touch()

    def _replan(self) -> None:
        specs: list[ProcessSpec] = []
        for name, local in self.models.items():
            specs += self._plan_model(local)
            if local.mode != "split" and local.listeners_asked:
                self._ask_listeners(local, ())
            self._log_plan(name, local)
        desired = tuple(specs)
        if desired == self.desired:
            return
        before = {s.key: s for s in self.desired or ()}
        self.desired = desired
        after = {s.key: s for s in desired}
        for key in before.keys() - after.keys():
            self._set(key, "down", 0)  # about to be stopped: stop routing to it now
        for spec in desired:
            if before.get(spec.key) != spec:
                # New or changed: whatever ran under this key is about to go; stop routing to it now.
                self._set(spec.key, "starting", 0)
        self.tell("supervisor", DesiredProcesses(specs=desired))

    def _log_plan(self, name: str, local: LocalModel) -> None:
        plan = local.plan
        summary = (
            local.mode,
            plan.host if plan else self.own_id,
            plan.workers if plan else (),
            plan.fractions if plan else (),
            local.detail,
        )
        if self.logged_plan.get(name) == summary:
            return
        self.logged_plan[name] = summary
        self.log.info(
            "election.plan",
            model=name,
            mode=local.mode,
            host=summary[1],
            workers=list(summary[2]),
            fractions=list(summary[3]),
            detail=local.detail,
        )
        if local.shortfall is not None:
            self.log.warning(
                "election.waiting",
                model=name,
                needed_bytes=local.shortfall.needed_bytes,
                available_bytes=local.shortfall.available_bytes,
                reason=local.detail,
            )

    # -- supervisor reports ---------------------------------------------------------------------------

    def _model_of(self, key: str) -> tuple[LocalModel | None, str]:
        kind, name = parse_key(key)
        return self.models.get(name), kind

    def _announce(self) -> None:
        serving = tuple(sorted(n for n, m in self.models.items() if m.server == "ready"))
        rpc_ready = tuple(sorted(n for n, m in self.models.items() if m.rpc == "ready"))
        msg = SetLocalAnnouncement(
            models=tuple(self.models), serving=serving, vram_bytes=self.vram_bytes, rpc_ready=rpc_ready
        )
        self.tell("registry", msg)

    def _set(self, key: str, state: str, port: int) -> None:
        local, kind = self._model_of(key)
        if local is None:
            return
        name = local.ref.name
        if kind == "rpc":
            local.rpc, local.rpc_port = state, port
            self.tell("router", LocalServing(model=name, port=port, kind="rpc-server"))
            self._touch()  # a split host starts llama-server once its own rpc-server is up
        else:
            local.server, local.port = state, port
            self.tell("router", LocalServing(model=name, port=port))
        self._announce()

    @handles(LlamaReady)
    def on_ready(self, msg: LlamaReady) -> None:
        self._set(msg.key, "ready", msg.port)

    @handles(LlamaFailed)
    def on_failed(self, msg: LlamaFailed) -> None:
        self._set(msg.key, "failed" if msg.retry_in_s < 0 else "starting", 0)
        local, _ = self._model_of(msg.key)
        if local is not None:
            local.detail = msg.reason

    @handles(LlamaStopped)
    def on_stopped(self, msg: LlamaStopped) -> None:
        self._set(msg.key, "down", 0)

    # -- status -----------------------------------------------------------------------------------------

    def _state(self, local: LocalModel) -> str:
        if local.mode in ("solo", "split"):
            return {"ready": local.mode, "failed": "failed"}.get(local.server, "starting")
        if local.mode == "worker":
            return {"ready": "worker", "failed": "failed"}.get(local.rpc, "starting")
        return local.mode

    @handles(GetPlan)
    def on_plan(self, msg: GetPlan) -> PlanReply:
        names: set[str] = set(self.models)
        for ann in self.peers.values():
            names.update(ann.models)
        out = []
        for name in sorted(names):
            hosts = sorted(a.node_id for a in self.peers.values() if name in a.serving)
            local = self.models.get(name)
            if local is None:
                out.append(
                    ModelStatus(name=name, state="serving" if hosts else "waiting", hosts=tuple(hosts))
                )
                continue
            if local.server == "ready":
                hosts.insert(0, self.own_id)
            plan = local.plan
            out.append(
                ModelStatus(
                    name=name,
                    state=self._state(local),
                    hosts=tuple(hosts),
                    host=plan.host if plan else (self.own_id if local.mode == "solo" else ""),
                    workers=plan.workers if plan else (),
                    fractions=plan.fractions if plan else (),
                    size_bytes=local.ref.size_bytes,
                    needed_bytes=needed_bytes(local.ref.size_bytes),
                    available_bytes=local.shortfall.available_bytes if local.shortfall else self.vram_bytes,
                    detail=local.detail,
                )
            )
        return PlanReply(models=tuple(out))
