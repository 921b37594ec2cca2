"""How a node changes role: a standby that promotes itself restarts as an active member serving the
model it took, with the same identity and on the same ports; a promoted node that is no longer needed
restarts as the standby it was. The Standby actor decides (:mod:`actors.standby`); this is the part
of the :class:`~meshllm.node.Node` that carries it out, kept apart from the node's wiring.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshllm.config import ConfigError, HostPort, NodeConfig
from meshllm.models.catalog import ModelRef
from meshllm.models.hub import Hub
from meshllm.models.refs import HubRef
from meshllm.placement import needed_bytes
from meshllm.promotion import Offer
from meshllm.wire.invite import InviteError
from meshllm.wire.messages import Seed

if TYPE_CHECKING:
    from meshllm.console.server import ConsoleServer
    from meshllm.logsetup import Logger
    from meshllm.net.endpoint import MeshEndpoint
    from meshllm.serving.gateway import Gateway


class StandbyRoles:
    """The promotion and demotion half of a Node (a mixin: it uses the node's own fields)."""

    config: NodeConfig
    base_config: NodeConfig
    promoted_for: str
    promoted_reason: str
    blocked: dict[str, float]
    _extra_seeds: tuple[Seed, ...]
    log: Logger
    gateway: Gateway | None
    console: ConsoleServer | None
    endpoint: MeshEndpoint | None

    @property
    def node_id(self) -> str:
        raise NotImplementedError

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self, leave: bool = True) -> None:
        raise NotImplementedError

    def _standby_args(
        self,
        cfg: NodeConfig,
        models: tuple[ModelRef, ...],
        vram_bytes: int,
        hub_models: tuple[tuple[str, HubRef], ...] = (),
    ) -> dict[str, Any]:
        """The Standby actor's arguments: the models on disk it could serve, with what each needs, and
        the hub models it could fetch (their needs come from the hub, on the actor's threads)."""
        offers = tuple(
            Offer(m.name, needed_bytes(m.footprint_bytes), on_disk=True) for m in models if m.path != Path("")
        )
        return {
            "own_id": self.node_id,
            "offers": offers,
            "capacity_bytes": vram_bytes,
            "window_s": cfg.standby.promote_window_s,
            "demote_after_s": cfg.standby.demote_after_s,
            "promote": self._promote,
            "demote": self._demote,
            "promoted_for": self.promoted_for,
            "promoted_reason": self.promoted_reason,
            "demand_ratio": cfg.standby.demand_ratio,
            "demand_min_per_min": cfg.standby.demand_min_per_min,
            "blocked": {m: t for m, t in self.blocked.items() if t > time.monotonic()},
            "hub_models": hub_models,
            "hub": Hub(cache_dir=cfg.models.cache_dir) if hub_models else None,
            "context": cfg.models.context,
        }

    def _serve_entry(self, model: str) -> str:
        """The ``[models] serve`` entry of the base config that names ``model``."""
        from meshllm.node import resolve_models  # the node module imports this one

        models, _ = resolve_models(self.base_config)
        for entry, ref in zip(self.base_config.models.serve, models, strict=True):
            if ref.name == model:
                return entry
        raise KeyError(model)

    def _promote(self, model: str, reason: str, seeds: tuple[Seed, ...]) -> None:
        """Called by the Standby actor: restart this node as an active member serving ``model``."""
        base = self.base_config
        cfg = dataclasses.replace(
            self._pinned(base).with_node(role="active"),
            models=dataclasses.replace(
                base.models,
                serve=(self._serve_entry(model),),
                settings={m: s for m, s in base.models.settings.items() if m == model},
            ),
        )
        self.promoted_reason = reason
        self._restart(cfg, model, seeds, leave=False)

    def _demote(self, model: str, reason: str, seeds: tuple[Seed, ...]) -> None:
        """Called by the Standby actor of a promoted node: back to standby, peers told it leaves."""
        self.blocked[model] = time.monotonic() + self.base_config.standby.demote_after_s
        self._restart(self._pinned(self.base_config), "", seeds, leave=True)

    def _pinned(self, cfg: NodeConfig) -> NodeConfig:
        """``cfg`` on the ports this node has bound now, so clients and peers find it again."""
        assert self.gateway is not None and self.console is not None and self.endpoint is not None
        return dataclasses.replace(
            cfg.with_node(quic_listen=HostPort(cfg.node.quic_listen.host, self.endpoint.port)),
            api=dataclasses.replace(cfg.api, listen=HostPort(cfg.api.listen.host, self.gateway.port)),
            console=dataclasses.replace(
                cfg.console, listen=HostPort(cfg.console.listen.host, self.console.port)
            ),
        )

    def _restart(self, cfg: NodeConfig, promoted_for: str, seeds: tuple[Seed, ...], leave: bool) -> None:
        """Stop and start again as ``cfg``, on a thread of its own: the caller is one of the actors
        that stopping stops."""

        from meshllm.node import NodeStartError

        def run() -> None:
            self.log.info("node.restarting", role=cfg.node.role, promoted_for=promoted_for)
            self.stop(leave=leave)
            self.config, self.promoted_for, self._extra_seeds = cfg, promoted_for, seeds
            try:
                self.start()
            except (NodeStartError, ConfigError, InviteError) as exc:
                self.log.error("node.restart_failed", reason=str(exc))

        threading.Thread(target=run, name="node-restart", daemon=True).start()
