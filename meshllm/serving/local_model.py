"""What the Election knows about each model this node is configured to serve: its part in the plan,
the state of its llama.cpp children, its tunnel listeners, its tensor cache and, for a hub model,
its file. Plain data with the two views the Election reports: the plan summary it logs and the
:class:`ModelStatus` that ``/api/status`` shows."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm.logsetup import Logger
from meshllm.models.catalog import ModelRef
from meshllm.placement import Shortfall, SplitPlan, needed_bytes
from meshllm.wire.messages import ModelStatus

PlanSummary = tuple[str, str, tuple[str, ...], tuple[float, ...], str]


@dataclass
class LocalModel:
    """One configured model's place in this node's plan."""

    ref: ModelRef
    # solo | split | worker | standby | waiting | downloading | refused | resolving | failed
    mode: str = "waiting"
    server: str = "down"  # llama-server: down | starting | ready | failed
    rpc: str = "down"  # rpc-server: down | starting | ready | failed
    port: int = 0
    rpc_port: int = 0
    plan: SplitPlan | None = None
    shortfall: Shortfall | None = None
    detail: str = ""
    listening: dict[str, int] = field(default_factory=dict)  # tunnel listener port per worker
    listeners_asked: tuple[str, ...] = ()  # workers we asked the transport listeners for
    rpc_host_allowed: str = ""  # the host whose RPC tunnels the transport was told to accept
    cache: str = "empty"  # rpc tensor cache: empty | filling | filled
    fetch: str = ""  # a hub model's file: "" (on disk) | resolving | described | fetching | refused | failed
    fetch_error: str = ""
    logged_refusal: tuple[int, int] = (0, 0)

    @property
    def on_disk(self) -> bool:
        return not self.fetch

    def summary(self, own_id: str) -> PlanSummary:
        """(mode, host, workers, fractions, detail): what ``election.plan`` logs when it changes."""
        plan = self.plan
        return (
            self.mode,
            plan.host if plan else own_id,
            plan.workers if plan else (),
            plan.fractions if plan else (),
            self.detail,
        )

    def log_plan(self, log: Logger, summary: PlanSummary) -> None:
        """``election.plan`` (and ``election.waiting`` with the shortfall) for a plan that changed."""
        mode, host, workers, fractions, detail = summary
        log.info(
            "election.plan",
            model=self.ref.name,
            mode=mode,
            host=host,
            workers=list(workers),
            fractions=list(fractions),
            detail=detail,
        )
        if self.shortfall is not None:
            log.warning(
                "election.waiting",
                model=self.ref.name,
                needed_bytes=self.shortfall.needed_bytes,
                available_bytes=self.shortfall.available_bytes,
                reason=self.detail,
            )

    def state(self) -> str:
        """The state ``/api/status`` shows: the plan's mode, or how far its process has come."""
        if self.mode in ("solo", "split"):
            return {"ready": self.mode, "failed": "failed"}.get(self.server, "starting")
        if self.mode == "worker":
            return {"ready": "worker", "failed": "failed"}.get(self.rpc, "starting")
        return self.mode

    def status(self, own_id: str, peer_hosts: list[str], vram_bytes: int) -> ModelStatus:
        hosts = ([own_id] if self.server == "ready" else []) + peer_hosts
        plan = self.plan
        return ModelStatus(
            name=self.ref.name,
            state=self.state(),
            hosts=tuple(hosts),
            host=plan.host if plan else (own_id if self.mode == "solo" else ""),
            workers=plan.workers if plan else (),
            fractions=plan.fractions if plan else (),
            size_bytes=self.ref.size_bytes,
            needed_bytes=needed_bytes(self.ref.footprint_bytes),
            available_bytes=self.shortfall.available_bytes if self.shortfall else vram_bytes,
            detail=self.detail,
        )
