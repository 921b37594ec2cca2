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

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from actors.base import Directory, MsgpackActor, handles
from meshllm.config.sections import ModelSettings
from meshllm.logsetup import Logger
from meshllm.models.catalog import ModelRef
from meshllm.models.devices import GpuMemory
from meshllm.models.fit import download_fit
from meshllm.placement import Candidate, Shortfall, fits_solo, needed_bytes, plan_split
from meshllm.serving.cache_fill import fill_in_background
from meshllm.serving.local_model import LocalModel
from meshllm.serving.process_specs import (
    parse_key,
    rpc_spec,
    served_context,
    server_spec,
    split_server_spec,
)
from meshllm.serving.tensor_split import expected_devices, tensor_split
from meshllm.wire.messages import (
    AllowRpcHost,
    DesiredProcesses,
    EnsureRpcListeners,
    FetchModel,
    GetPlan,
    LlamaFailed,
    LlamaReady,
    LlamaStopped,
    LocalServing,
    ModelDescribed,
    ModelFetched,
    ModelStatus,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    PlanReply,
    ProcessSpec,
    RefuseModel,
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
        context: int | None = None,
        pending: tuple[str, ...] = (),
        promoted_for: str = "",
        gpus: tuple[GpuMemory, ...] = (),
        settings: dict[str, ModelSettings] | None = None,
    ) -> None:
        super().__init__(directory, logger)
        self.settings = settings or {}  # [models.settings]: per-model llama-server settings, by name
        self.contexts: dict[str, int] = {}  # the context each model is served with, once its file is here
        # The GPUs this node's llama.cpp build lists (empty for a CPU build): with them, a solo model
        # is offloaded, a split host keeps its share on them, and a worker's rpc-server exposes them.
        self.gpus = gpus
        self.gpu_names = tuple(g.device for g in gpus if g.device)
        self.cache_dir = cache_dir
        self.threads = threads
        self.context = context  # -c for llama-server (None: llama.py's default)
        self.own_id = own_id
        self.vram_bytes = vram_bytes
        self.force_split = force_split
        # Config order is priority for the memory budget; hub models (``pending``) wait for the
        # Downloader to say what they need, and get their file only when this node needs it.
        self.models = {
            m.name: LocalModel(ref=m, fetch="resolving" if m.name in pending else "") for m in models
        }
        self.peers: dict[str, PeerAnnouncement] = {}
        self.suspects: dict[str, float] = {}
        self.desired: tuple[ProcessSpec, ...] | None = None
        self.free = vram_bytes  # what the models planned so far leave of this node's memory
        self.promoted_for = promoted_for  # a standby promoted to serve this: say so once it serves
        self.logged_plan: dict[str, tuple[object, ...]] = {}
        self.announced_stuck: tuple[str, ...] = ()
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

    def _worker_rpc_spec(self, local: LocalModel) -> list[ProcessSpec]:
        """A split worker's rpc-server, once its tensor cache is filled from this node's own copy of
        the GGUF: the host then sends a hash, not the bytes, for every tensor over llama.cpp's 10 MiB
        threshold. The fill runs off the actor thread. Without a local copy (workers never download)
        or with the cache off, the rpc-server starts bare and every weight crosses the mesh."""
        name = local.ref.name
        if self.cache_dir is None or not local.on_disk:
            return [rpc_spec(name, self.threads, devices=self.gpu_names)]
        if local.cache == "empty":
            local.cache = "filling"
            fill_in_background(local.ref, self.cache_dir, self.teller())
        if local.cache != "filled":
            return []
        return [rpc_spec(name, self.threads, self.cache_dir, self.gpu_names)]

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
        """One model's part of the plan. Models are planned in config order against one budget
        (``self.free``): each takes what it needs here from what the models before it left."""
        name, size = local.ref.name, local.ref.footprint_bytes
        need = needed_bytes(size)
        cands, force = self._candidates(name)
        local.plan, local.shortfall, local.detail = None, None, ""
        if local.fetch in ("resolving", "failed"):
            local.mode, local.detail = local.fetch, local.fetch_error
            return []
        if not force and fits_solo(self.vram_bytes, size):
            if need > self.free:
                return self._wait(local, need, "the models before it in [models] serve take the rest")
            local.mode = "solo"
            self.free -= need
            if not local.on_disk:
                return self._fetch(local)
            return [self._server_spec(local)]
        plan = plan_split(cands, size, force)
        if isinstance(plan, Shortfall):
            peers = [c.vram_bytes for c in cands if c.node_id != self.own_id]
            why = "" if local.on_disk else download_fit(plan.needed_bytes, self.vram_bytes, peers).reason
            return self._wait(local, plan.needed_bytes, why, plan.available_bytes)
        members = [plan.host, *plan.workers]
        if self.own_id in members:
            share = int(need * plan.fractions[members.index(self.own_id)])
            if share > self.free:
                return self._wait(
                    local, share, "its share of the split does not fit what earlier models left"
                )
            self.free -= share
        local.plan = plan
        if plan.host != self.own_id:
            local.mode = "worker" if self.own_id in plan.workers else "standby"
            return self._worker_rpc_spec(local) if local.mode == "worker" else []
        if not local.on_disk:
            return self._fetch(local)  # a split host needs the file; its workers do not
        if not plan.workers:  # forced, but nobody to split with
            local.mode = "solo"
            local.detail = "split forced but no other node serves this model"
            return [self._server_spec(local)]
        local.mode = "split"
        if self.gpus:
            return self._gpu_split(local, plan.workers, plan.fractions)
        # The host's own share goes to its own rpc-server over loopback: a tensor cache would save a
        # local copy at memory speed and cost a read, hash and write of the whole model first.
        specs = [rpc_spec(name, self.threads)]
        if not self._tunnels_ready(local, plan.workers, own_rpc=True):
            return specs
        ports = [local.rpc_port] + [local.listening[w] for w in plan.workers]
        endpoints = [(f"127.0.0.1:{p}", [0]) for p in ports[:1]]
        endpoints += [(f"127.0.0.1:{local.listening[w]}", self._worker_frees(w)) for w in plan.workers]
        shares = dict(zip((e for e, _ in endpoints), plan.fractions, strict=True))
        split = tensor_split(expected_devices((), endpoints), (), shares)
        settings = self.settings.get(name)
        specs.append(
            split_server_spec(local.ref, self.threads, ports, split, self.context, settings=settings)
        )
        return specs

    def _gpu_split(
        self, local: LocalModel, workers: tuple[str, ...], fractions: tuple[float, ...]
    ) -> list[ProcessSpec]:
        """A host with GPUs keeps its share on them, in its own llama-server: no rpc-server of its own."""
        if not self._tunnels_ready(local, workers, own_rpc=False):
            return []
        endpoints = [(f"127.0.0.1:{local.listening[w]}", self._worker_frees(w)) for w in workers]
        shares = dict(zip((e for e, _ in endpoints), fractions[1:], strict=True))
        split = tensor_split(expected_devices(self.gpus, endpoints), self.gpus, shares, fractions[0])
        ports = [local.listening[w] for w in workers]
        settings = self.settings.get(local.ref.name)
        return [
            split_server_spec(
                local.ref, self.threads, ports, split, self.context, gpu_host=True, settings=settings
            )
        ]

    def _server_spec(self, local: LocalModel) -> ProcessSpec:
        """A model's llama-server on this node alone."""
        settings = self.settings.get(local.ref.name)
        return server_spec(
            local.ref, self.threads, context=self.context, gpu=bool(self.gpus), settings=settings
        )

    def _tunnels_ready(self, local: LocalModel, workers: tuple[str, ...], own_rpc: bool) -> bool:
        """Every worker's rpc-server (and, ``own_rpc``, this node's) up, and a listener open to each."""
        name = local.ref.name
        not_ready = [w for w in workers if name not in self.peers[w].rpc_ready]
        own_waiting = own_rpc and local.rpc != "ready"
        if own_waiting or not_ready:
            local.detail = "waiting for rpc-servers: " + ", ".join(
                (["this node"] if own_waiting else []) + [w[:12] for w in not_ready]
            )
            return False
        if set(local.listening) != set(workers):
            self._ask_listeners(local, workers)
            local.detail = "opening RPC tunnel listeners"
            return False
        return True

    def _worker_frees(self, worker: str) -> list[int]:
        """The free bytes of each device a worker's rpc-server exposes: its announced GPUs, or its CPU."""
        return [g.free_bytes for g in self.peers[worker].gpus] or [0]

    def _wait(
        self, local: LocalModel, needed: int, why: str, available: int | None = None
    ) -> list[ProcessSpec]:
        """The model waits for memory; status and the log say how much is missing."""
        have = self.free if available is None else available
        local.mode, local.shortfall = "waiting", Shortfall(needed_bytes=needed, available_bytes=have)
        if available is None:
            local.detail = f"needs {needed} bytes of VRAM, {have} left on this node: {why}"
        else:
            local.detail = why or f"needs {needed} bytes of VRAM, the group has {have}"
        if not local.on_disk:  # refused: not a byte of it is fetched until a split becomes possible
            local.mode = "refused"
            if local.fetch != "refused" or local.logged_refusal != (needed, have):
                local.fetch, local.logged_refusal = "refused", (needed, have)
                self.tell(
                    "downloader",
                    RefuseModel(
                        model=local.ref.name, needed_bytes=needed, available_bytes=have, reason=local.detail
                    ),
                )
        return []

    def _fetch(self, local: LocalModel) -> list[ProcessSpec]:
        """This node needs a hub model's file: ask the Downloader for it (once)."""
        local.mode, local.detail = "downloading", "downloading the model"
        if local.fetch != "fetching":
            local.fetch = "fetching"
            self.tell("downloader", FetchModel(model=local.ref.name))
        return []

    @handles(ModelDescribed)
    def on_described(self, msg: ModelDescribed) -> None:
        self._file_news(
            msg.model,
            msg.error,
            lambda ref: replace(ref, size_bytes=msg.size_bytes, kv_bytes=msg.kv_bytes),
            "described",
        )

    @handles(ModelFetched)
    def on_fetched(self, msg: ModelFetched) -> None:
        self._file_news(
            msg.model,
            msg.error,
            lambda ref: ModelRef(ref.name, Path(msg.path), msg.size_bytes, msg.kv_bytes),
            "",
        )

    def _file_news(self, name: str, error: str, new_ref: Callable[[ModelRef], ModelRef], fetch: str) -> None:
        """The Downloader's news of a hub model: what it needs (``described``), or its file (on disk)."""
        local = self.models.get(name)
        if local is None or local.on_disk:
            return
        if error:
            local.fetch, local.fetch_error = "failed", error
        else:
            local.ref, local.fetch = new_ref(local.ref), fetch
        self._touch()

    def _ask_listeners(self, local: LocalModel, workers: tuple[str, ...]) -> None:
        """Ask the transport for tunnel listeners to these workers (empty: close them); the answer
        comes back as RpcListeners. Asked once per set of workers, not on every re-plan."""
        if local.listeners_asked == workers:
            return
        local.listeners_asked = workers
        local.listening = {}
        seeds = tuple(Seed(node_id=w, addrs=self.peers[w].addrs) for w in workers)
        self.tell("transport", EnsureRpcListeners(model=local.ref.name, workers=seeds))

    def _allow_rpc_host(self, local: LocalModel) -> None:
        """Tell the transport which node may tunnel to this node's rpc-server for the model: the
        host of the plan that makes this node its worker, no one otherwise. Told before the
        rpc-server starts (the host dials only after this node announces it ready)."""
        plan = local.plan
        host = plan.host if local.mode == "worker" and plan is not None else ""
        if host != local.rpc_host_allowed:
            local.rpc_host_allowed = host
            self.tell("transport", AllowRpcHost(model=local.ref.name, host=host))

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
        self.free = self.vram_bytes
        for name, local in self.models.items():
            specs += self._plan_model(local)
            if local.mode != "split" and local.listeners_asked:
                self._ask_listeners(local, ())
            self._allow_rpc_host(local)
            self._log_plan(name, local)
        if self._stuck() != self.announced_stuck:
            self.announced_stuck = self._stuck()
            self._announce()
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
        # Nothing to run needs no supervisor: a node that serves no model runs none.
        tell = self.directory.tell if desired else self.directory.tell_if_running
        tell("supervisor", DesiredProcesses(specs=desired))

    def _log_plan(self, name: str, local: LocalModel) -> None:
        summary = local.summary(self.own_id)
        if self.logged_plan.get(name) != summary:
            self.logged_plan[name] = summary
            local.log_plan(self.log, summary)

    # -- supervisor reports ---------------------------------------------------------------------------

    def _model_of(self, key: str) -> tuple[LocalModel | None, str]:
        kind, name = parse_key(key)
        return self.models.get(name), kind

    def _announce(self) -> None:
        serving = tuple(sorted(n for n, m in self.models.items() if m.server == "ready"))
        rpc_ready = tuple(sorted(n for n, m in self.models.items() if m.rpc == "ready"))
        msg = SetLocalAnnouncement(
            models=tuple(self.models),
            serving=serving,
            vram_bytes=self.vram_bytes,
            rpc_ready=rpc_ready,
            stuck=self._stuck(),
            model_bytes={n: m.ref.size_bytes for n, m in self.models.items()},
            model_context={n: self._context(m) for n, m in self.models.items() if self._context(m)},
        )
        self.tell("registry", msg)
        self.tell("router", msg)

    def _context(self, local: LocalModel) -> int:
        """The context ``local`` is served with here (0 while its file is not here to say)."""
        name = local.ref.name
        if name not in self.contexts and local.on_disk:
            self.contexts[name] = served_context(local.ref, self.context)
        return self.contexts.get(name, 0)

    def _stuck(self) -> tuple[str, ...]:
        """Models this node wants but cannot serve now: what a standby may take (a gap)."""
        return tuple(sorted(n for n, m in self.models.items() if m.mode in ("waiting", "refused", "failed")))

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
        kind, model = parse_key(msg.key)
        if self.promoted_for and model == self.promoted_for and kind == "server":
            self.log.info("standby.promoted", model=model, port=msg.port)
            self.promoted_for = ""  # said once

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
            out.append(local.status(self.own_id, hosts, self.vram_bytes))
        return PlanReply(models=tuple(out))
