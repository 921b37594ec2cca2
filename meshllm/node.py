"""A node: wires identity, mesh membership, the QUIC endpoint, the actors and the HTTP servers
together from one :class:`~meshllm.config.NodeConfig`, and takes them down again.

Tests and embedding code use it directly::

    node = Node(config).start()
    node.invite_token          # an active token: give it to another node's [node] join
    node.invite("client")      # a token for a client (see meshllm.wire.grants for the roles)
    node.status()              # the registry's StatusReply
    node.stop()                # leaving notice to peers, then everything stops
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

from actors.base import Directory
from actors.downloader import Downloader
from actors.election import Election
from actors.heartbeat import Heartbeat
from actors.passive_router import PassiveRouter
from actors.peer_registry import PeerRegistry
from actors.router import Router
from actors.standby import Standby
from actors.supervisor import Supervisor
from actors.transport_bridge import TransportBridge
from meshllm.config import ConfigError, NodeConfig
from meshllm.console.server import ConsoleServer
from meshllm.console.timeline import Timeline
from meshllm.llama_build import installed_variant
from meshllm.logsetup import Logger, close_logger, make_logger
from meshllm.models.capacity import Capacity, GpuFreeMemory, detect_capacity
from meshllm.models.catalog import HUB, ModelNotFound, ModelRef, resolve_model
from meshllm.models.hub import Hub
from meshllm.models.refs import HubRef
from meshllm.net.endpoint import MeshEndpoint
from meshllm.net.http_tunnel import HttpTunnelServer
from meshllm.serving.demand import DemandCounter
from meshllm.serving.gateway import Gateway
from meshllm.serving.llama import LlamaNotFound, find_binaries
from meshllm.standby_roles import StandbyRoles
from meshllm.wire.framing import StreamKind
from meshllm.wire.gate import Gate
from meshllm.wire.grants import DEFAULT_TTL_S, fingerprint
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import InviteError, InviteToken, MeshMembership, own_grant, role_problem, write_addrs
from meshllm.wire.messages import (
    Ack,
    GetStatus,
    GpuReport,
    HostInfo,
    JoinMesh,
    Leave,
    PeerAnnouncement,
    PeerLeaving,
    Seed,
    StatusReply,
    TunnelRequest,
)

LEAVE_TIMEOUT_S = 1.0
STANDBY_REFRESH_S = 10.0


class NodeStartError(RuntimeError):
    """The node cannot start (bad token, port in use, unreadable data dir)."""


def local_addresses(host: str, port: int) -> tuple[str, ...]:
    """Where peers can reach a socket bound to ``host``: itself, or for a wildcard every interface
    address (non-loopback first, so remote peers try a reachable one first)."""
    if host not in ("0.0.0.0", "::", ""):
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",)
    outside: list[str] = []
    loopback: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != socket.AF_INET:
                continue
            (loopback if a.address.startswith("127.") else outside).append(f"{a.address}:{port}")
    return tuple(outside + loopback) or (f"127.0.0.1:{port}",)


def resolve_models(config: NodeConfig) -> tuple[tuple[ModelRef, ...], tuple[tuple[str, HubRef], ...]]:
    """Every ``[models] serve`` entry in config order: files on disk as they are, hub models as
    placeholders (size 0 until the Downloader describes them), plus those hub references by name."""
    base = config.source.parent if config.source is not None else None
    refs: list[ModelRef] = []
    hub: list[tuple[str, HubRef]] = []
    for i, entry in enumerate(config.models.serve):
        try:
            resolved = resolve_model(entry, base, config.models.context)
        except ModelNotFound as exc:
            raise ConfigError(f"models.serve[{i}]: {exc}", key="models.serve") from None
        if isinstance(resolved, HubRef):
            name = entry if entry in HUB else resolved.name
            hub.append((name, resolved))
            resolved = ModelRef(name, Path(""), 0)
        if resolved.name in {r.name for r in refs}:
            raise ConfigError(f"models.serve[{i}]: {resolved.name!r} is served twice", key="models.serve")
        refs.append(resolved)
    names = {r.name for r in refs}
    for name in config.models.settings:
        if name not in names:
            served = ", ".join(sorted(names)) or "none"
            raise ConfigError(
                f"models.settings.{name}: not a model this node serves (served: {served})",
                key=f"models.settings.{name}",
            )
    return tuple(refs), tuple(hub)


def parse_join_tokens(tokens: tuple[str, ...]) -> list[InviteToken]:
    parsed = []
    for i, text in enumerate(tokens):
        try:
            parsed.append(InviteToken.decode(text))
        except InviteError as exc:
            raise ConfigError(f"node.join[{i}]: {exc}", key="node.join") from None
    return parsed


class Node(StandbyRoles):
    """One meshllm node in this process."""

    def __init__(self, config: NodeConfig, log_stream: IO[str] | None = None) -> None:
        self.config = config
        self._log_stream = log_stream
        self.directory = Directory()
        self.timeline = Timeline()  # the console's, fed by the log; kept across role changes
        self.log: Logger = make_logger(
            config.node.name, config.log.format, None, log_stream, tap=self.timeline.observe
        )
        self.identity: NodeIdentity | None = None
        self.membership: MeshMembership | None = None
        self.gate: Gate | None = None
        self.endpoint: MeshEndpoint | None = None
        self.console: ConsoleServer | None = None
        self.gateway: Gateway | None = None
        self.tunnel_server: HttpTunnelServer | None = None
        self.addrs: tuple[str, ...] = ()
        self.incarnation = 0
        self.capacity: Capacity | None = None
        self.gpu_free: GpuFreeMemory | None = None
        self._started = False
        self._stop_lock = threading.Lock()
        self.stopped = threading.Event()  # set once stop() has finished
        self.fatal: str | None = None  # why the node stopped itself (an actor crashed)
        self.directory.on_dropped = self._tell_dropped
        self.directory.on_actor_failed = self._actor_failed
        # Standby promotion: the config this node was started with (a standby's), what it was promoted
        # for, and models it may not take again before a time (no promotion/demotion cycle is faster
        # than [standby] demote_after_s).
        self.base_config = config
        self.promoted_for = ""
        self.promoted_reason = ""
        self.blocked: dict[str, float] = {}
        self._extra_seeds: tuple[Seed, ...] = ()

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self) -> Node:
        cfg = self.config
        data_dir = cfg.node.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NodeStartError(f"data dir {data_dir}: {exc}") from None
        if cfg.log.file:
            close_logger(self.log)
            self.log = make_logger(
                cfg.node.name, cfg.log.format, data_dir / "node.log", self._log_stream, tap=self.timeline.observe
            )
        tokens = parse_join_tokens(cfg.node.join)
        models, hub_models = resolve_models(cfg)
        binaries = None
        if models:
            try:
                binaries = find_binaries(cfg.llama.bin_dir)
            except LlamaNotFound as exc:
                raise NodeStartError(str(exc)) from None
        self.identity = NodeIdentity.load_or_create(data_dir)
        self.membership = MeshMembership.resolve(data_dir, tokens)
        grant = own_grant(data_dir, self.membership, self.identity.node_id, tokens, time.time())
        problem = role_problem(cfg.node.role, grant, promoted=bool(self.promoted_for))
        if problem:
            raise NodeStartError(problem)
        self.gate = Gate(data_dir, self.membership, self.identity, grant)
        self.log = self.log.bind(node_id=self.identity.node_id)
        vram = detect_capacity(cfg.node.vram_gb, binaries.server if binaries is not None else None)
        self.capacity = vram
        self.gpu_free = GpuFreeMemory(vram.gpus)
        if vram.list_error:
            self.log.warning("capacity.list_devices_failed", reason=vram.list_error)
        if binaries is not None:
            self.log.info(
                "llama.backend",
                backend=vram.backend,
                devices=[f"{d.name}: {d.description}" for d in vram.devices or ()],
                bin_dir=str(binaries.server.parent),
                variant=installed_variant(binaries.server),
            )
        self.incarnation = time.time_ns()

        listen = cfg.node.quic_listen
        self.endpoint = MeshEndpoint(
            self.identity, self.gate, cfg.node.role, listen.host, listen.port, self.directory, self.log
        )
        try:
            port = self.endpoint.start()
        except OSError as exc:
            self.endpoint.stop()
            raise NodeStartError(f"node.quic_listen {listen}: {exc}") from None
        if cfg.node.advertise:
            self.addrs = tuple(str(a) for a in cfg.node.advertise)
        else:
            self.addrs = local_addresses(listen.host, port)
        write_addrs(data_dir, self.identity.node_id, self.addrs)  # for meshllm invite (port 0)
        self.endpoint.loop_thread.run(self.endpoint.revocations.listen(data_dir), timeout=5)  # meshllm revoke

        own = PeerAnnouncement(
            node_id=self.identity.node_id,
            name=cfg.node.name,
            role=cfg.node.role,
            addrs=self.addrs,
            vram_bytes=vram.bytes,
            models=tuple(m.name for m in models),
            serving=(),
            incarnation=self.incarnation,
            version=0,
            force_split=cfg.models.force_split,
            promoted_for=(self.promoted_for,) if self.promoted_for else (),
            gpus=self._gpu_reports(),
        )
        self._started = True
        self.stopped.clear()
        self._spawn(TransportBridge, endpoint=self.endpoint)
        seeds = tuple(
            Seed(node_id=t.node_id, addrs=t.addrs) for t in tokens if t.node_id != self.identity.node_id
        )
        known = {s.node_id for s in seeds}
        seeds += tuple(
            s for s in self._extra_seeds if s.node_id not in known and s.node_id != self.identity.node_id
        )
        if self.passive:
            self._spawn(
                PassiveRouter,
                own_id=self.identity.node_id,
                own_name=cfg.node.name,
                role=cfg.node.role,
                seeds=seeds,
                # A standby refreshes more often: its tables decide takeovers, and standbys are few.
                refresh_s=min(cfg.timing.route_refresh_s, STANDBY_REFRESH_S)
                if cfg.node.role == "standby"
                else cfg.timing.route_refresh_s,
            )
            if cfg.node.role == "standby":
                self._spawn(Standby, **self._standby_args(cfg, models, vram.bytes, hub_models))
        else:
            self._spawn(
                PeerRegistry,
                own=own,
                timing=cfg.timing,
                signer=self.identity,  # signs each version of the announcement: peers refuse unsigned ones
                gpus_now=self._gpu_reports if own.gpus else None,
            )
            self._spawn(Heartbeat, timing=cfg.timing)
            own_host = HostInfo(node_id=own.node_id, addrs=own.addrs, vram_bytes=own.vram_bytes)
            claims = (self.promoted_for,) if self.promoted_for else ()
            self._spawn(Router, own=own_host, own_models=own.models, own_claims=claims)
            if self.promoted_for:
                self._spawn(Standby, **self._standby_args(self.base_config, models, vram.bytes))
            if binaries is not None:
                self._spawn(
                    Supervisor, binaries=binaries, subscriber=Election.name, log_dir=data_dir / "llama-logs"
                )
            self._spawn(
                Election,
                own_id=self.identity.node_id,
                vram_bytes=vram.bytes,
                models=models,
                force_split=cfg.models.force_split,
                cache_dir=data_dir / "llama-cache" if cfg.llama.tensor_cache else None,
                threads=cfg.llama.threads,
                context=cfg.models.context,
                pending=tuple(name for name, _ in hub_models),
                promoted_for=self.promoted_for,
                gpus=vram.llama_gpus,
                settings=cfg.models.settings,
            )
            if hub_models:  # after the Election: it is who the Downloader reports to
                self._spawn(
                    Downloader,
                    models=hub_models,
                    hub=Hub(cache_dir=cfg.models.cache_dir),
                    context=cfg.models.context,
                )
        demand = DemandCounter()  # shared by the two places that serve requests, read by the gateway
        self.tunnel_server = HttpTunnelServer(self.directory, self.log, demand, self.endpoint.route_now)
        self.endpoint.register_tunnel(StreamKind.HTTP_TUNNEL, self.tunnel_server.handle, passive_ok=True)
        self.endpoint.fast.register(TunnelRequest, self.tunnel_server.serve_fast, passive_ok=True)

        status_from, plan_from = ("router", "router") if self.passive else ("registry", "election")
        self.console = ConsoleServer(
            self.directory,
            cfg.console.listen.host,
            cfg.console.listen.port,
            self._extra,
            status_from,
            plan_from,
            timeline=self.timeline,
            api_address=lambda: (cfg.api.listen.host, self.gateway.port) if self.gateway is not None else None,
            api_keys=cfg.console.api_keys,
            gateway_key=cfg.api.api_keys[0] if cfg.api.api_keys else None,
            logger=self.log,
        )
        self.gateway = Gateway(
            self.directory,
            self.endpoint,
            cfg.api.listen.host,
            cfg.api.listen.port,
            self.log,
            demand,
            api_keys=cfg.api.api_keys,
            host_wait_s=cfg.api.host_wait_s,
            spares=self.tunnel_server.spares,
        )
        try:
            console_port = self.console.start()
        except OSError as exc:
            self.stop(leave=False)
            raise NodeStartError(f"console.listen {cfg.console.listen}: {exc}") from None
        try:
            api_port = self.gateway.start()
        except OSError as exc:
            self.stop(leave=False)
            raise NodeStartError(f"api.listen {cfg.api.listen}: {exc}") from None

        self.log.info(
            "node.started",
            name=cfg.node.name,
            role=cfg.node.role,
            quic_port=port,
            addrs=list(self.addrs),
            console=f"http://{cfg.console.listen.host}:{console_port}",
            api=f"http://{cfg.api.listen.host}:{api_port}/v1",
            vram_bytes=vram.bytes,
            vram_source=vram.source,
            mesh_id=self.membership.mesh_id,
        )
        if self.passive:
            if not seeds:
                self.log.warning(
                    "mesh.no_join", reason="a passive node needs [node] join tokens to find the mesh"
                )
        else:
            if self.membership.secret:  # never the token itself: logs travel further than secrets should
                self.log.info(
                    "mesh.invite",
                    mesh=fingerprint(self.membership.authority),
                    hint="print a token with: meshllm invite --config NODE.toml --role client|standby|active",
                )
            if seeds:
                self.directory.tell("registry", JoinMesh(seeds=seeds))
        return self

    def _spawn(self, actor_cls: Any, **kwargs: Any) -> None:
        actor_cls.start(self.directory, self.log, **kwargs)  # it registers its own name

    def _tell_dropped(self, name: str, message: str) -> None:
        self.log.warning("actor.tell_dropped", to=name, message=message, reason="no such actor is running")

    def _actor_failed(self, name: str, reason: str) -> None:
        """An actor died of an error: its state is gone, so the node stops rather than limp on;
        ``meshllm run`` then exits non-zero and a service manager starts it afresh."""
        if self.fatal is not None:
            return
        self.fatal = f"actor {name} crashed: {reason}"
        self.log.error("node.fatal", reason=self.fatal)
        threading.Thread(target=self.stop, name="node-fatal-stop", daemon=True).start()

    def stop(self, leave: bool = True) -> None:
        """Stop the node; with ``leave`` peers are told first (they log ``peer.left``)."""
        with self._stop_lock:
            if not self._started:
                return
            self._started = False
        if leave:
            notice = PeerLeaving(node_id=self.node_id, incarnation=self.incarnation)
            try:
                self.directory.ask(
                    "transport", Leave(notice=notice, timeout_s=LEAVE_TIMEOUT_S), Ack, LEAVE_TIMEOUT_S + 2
                )
            except Exception as exc:
                self.log.warning("mesh.leave_failed", reason=str(exc))
            self._drain()
        if self.gateway is not None:
            self.gateway.stop()
        if self.console is not None:
            self.console.stop()
        if self.tunnel_server is not None and self.endpoint is not None:
            try:
                self.endpoint.loop_thread.run(self.tunnel_server.close(), timeout=5)
            except Exception:
                pass
        self.directory.stop_all(timeout=15.0)
        if self.endpoint is not None:
            self.endpoint.stop()  # after the actors: the transport bridge uses it until it stops
        self.log.info("node.stopped")
        close_logger(self.log)
        self.stopped.set()

    def _drain(self) -> None:
        """Let the answers under way finish before llama-server stops: those this node's tunnels stream
        to other nodes (new ones are refused and go elsewhere) and those its gateway gives its own
        clients."""
        if self.tunnel_server is None or self.endpoint is None:
            return
        tunnels, gateway = self.tunnel_server, self.gateway
        drain_s = self.config.timing.drain_s
        under_way = tunnels.in_flight.count + (gateway.in_flight.count if gateway is not None else 0)

        async def drain() -> int:
            waits = [tunnels.drain(drain_s)]
            if gateway is not None:
                waits.append(gateway.in_flight.wait_idle(drain_s))
            return sum(await asyncio.gather(*waits))

        try:
            left = self.endpoint.loop_thread.run(drain(), timeout=drain_s + 5)
        except Exception as exc:
            self.log.warning("node.drain_failed", reason=str(exc))
            return
        if under_way or left:
            self.log.info("node.drained", requests=under_way, cut=left, limit_s=drain_s)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- views ------------------------------------------------------------------------------------------

    @property
    def passive(self) -> bool:
        """Clients and standby nodes use the mesh without joining its gossip."""
        return self.config.node.role != "active"

    @property
    def node_id(self) -> str:
        assert self.identity is not None, "node not started"
        return self.identity.node_id

    @property
    def invite_token(self) -> str:
        """An active token (it carries the mesh secret) for 24 hours."""
        return self.invite("active")

    def invite(self, role: str = "client", ttl_s: int = DEFAULT_TTL_S) -> str:
        """A token for ``role`` that expires in ``ttl_s`` (0: never); InviteError without the secret."""
        assert self.membership is not None, "node not started"
        return self.membership.invite(self.node_id, self.addrs, role, time.time(), ttl_s).encode()

    @property
    def console_url(self) -> str:
        assert self.console is not None
        return f"http://{self.config.console.listen.host}:{self.console.port}"

    @property
    def api_url(self) -> str:
        assert self.gateway is not None
        return f"http://{self.config.api.listen.host}:{self.gateway.port}/v1"

    @property
    def quic_port(self) -> int:
        assert self.endpoint is not None
        return self.endpoint.port

    def status(self, timeout: float = 5.0) -> StatusReply:
        return self.directory.ask("registry", GetStatus(), StatusReply, timeout)

    def peer_ids(self) -> set[str]:
        return {p.node_id for p in self.status().peers}

    def _gpu_reports(self) -> tuple[GpuReport, ...]:
        """This node's GPUs as its announcement carries them, free memory as of now."""
        gpus = self.gpu_free.gpus() if self.gpu_free else ()
        return tuple(GpuReport(g.name, g.total_bytes, g.free_bytes) for g in gpus)

    def _extra(self) -> dict[str, Any]:
        return {
            "mesh_id": self.membership.mesh_id if self.membership else None,
            "addrs": list(self.addrs),
            "incarnation": self.incarnation,
            "capacity_source": self.capacity.source if self.capacity else None,
            "gpus": [dataclasses.asdict(g) for g in self.gpu_free.gpus()] if self.gpu_free else [],
        }
