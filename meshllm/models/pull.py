"""``meshllm download`` and ``meshllm models``: the same fit check a node runs, from the command line.

The memory is this node's (config, else what the llama.cpp build and NVML report), less what the
running node (when its console answers) already plans for other models; the split peers are the
active nodes that running node knows to serve or want the same model. Without a running node the
check counts this machine alone.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from meshllm.config import NodeConfig
from meshllm.models.capacity import detect_capacity
from meshllm.models.catalog import HUB, PACKAGED, ModelNotFound, ModelRef, resolve_model
from meshllm.models.fit import FitDecision, download_fit, model_need
from meshllm.models.hub import Hub, HubError, RemoteModel
from meshllm.models.refs import HubRef
from meshllm.serving.llama import LlamaNotFound, find_binaries

PLANNED_STATES = ("solo", "split", "worker", "starting", "downloading")


@dataclass(frozen=True)
class MeshView:
    """What this node has left and which peers could split a model with it."""

    free_bytes: int
    peers: dict[str, tuple[int, tuple[str, ...]]]  # node id -> (vram bytes, models)
    source: str  # "node" (a running node's status) or "machine"


def mesh_view(cfg: NodeConfig, timeout: float = 2.0) -> MeshView:
    try:
        server: Path | None = find_binaries(cfg.llama.bin_dir).server
    except LlamaNotFound:
        server = None
    capacity = detect_capacity(cfg.node.vram_gb, server).bytes
    url = f"http://{cfg.console.listen.host}:{cfg.console.listen.port}/api/status"
    keys = cfg.console.api_keys
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {keys[0]}"} if keys else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status: dict[str, Any] = json.loads(resp.read())
    except (OSError, ValueError):
        return MeshView(capacity, {}, "machine")
    taken = sum(
        int(m.get("needed_bytes", 0)) for m in status.get("models", []) if m.get("state") in PLANNED_STATES
    )
    peers = {
        p["node_id"]: (int(p.get("vram_bytes", 0)), tuple(p.get("models", ())))
        for p in status.get("peers", [])
        if p.get("role") == "active"
    }
    return MeshView(int(status.get("vram_bytes", capacity)) - taken, peers, "node")


def fit_for(remote: RemoteModel, name: str, view: MeshView, context: int) -> FitDecision:
    kv = remote.shape.kv_cache_bytes(context) if remote.shape is not None else 0
    split_peers = [vram for vram, models in view.peers.values() if name in models]
    return download_fit(model_need(remote.size_bytes, kv), max(view.free_bytes, 0), split_peers)


class Progress:
    """A progress bar on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out, self.total = out, total
        self.tty = out.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 5.0) and done < total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-6)
        pct = 100 * done / total if total else 100.0
        if self.tty:
            bar = "#" * int(pct / 100 * 30)
            self.out.write(
                f"\r[{bar:<30}] {pct:5.1f}% {done / 1e6:,.1f}/{total / 1e6:,.1f} MB {rate / 1e6:,.1f} MB/s"
            )
            if done >= total:
                self.out.write("\n")
        else:
            self.out.write(f"downloaded {done} of {total} bytes ({pct:.0f}%, {rate / 1e6:.1f} MB/s)\n")
        self.out.flush()


def download(
    cfg: NodeConfig,
    text: str,
    force: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
    hub_factory: Callable[[Path | None], Hub] = Hub,
) -> int:
    """The ``meshllm download`` command; returns its exit code (0 in cache, 1 failed, 3 refused)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        ref = resolve_model(text, Path.cwd(), cfg.models.context)
    except ModelNotFound as exc:
        err.write(f"meshllm: {exc}\n")
        return 1
    if isinstance(ref, ModelRef):
        out.write(f"{ref.path}\n")  # already a file on this machine
        return 0
    hub = hub_factory(cfg.models.cache_dir)
    name = text if text in HUB else ref.name
    try:
        cached = hub.cached(ref)
        if cached is not None:
            out.write(f"{cached}\n")
            return 0
        remote = hub.describe(ref)
    except HubError as exc:
        err.write(f"meshllm: {exc}\n")
        return 1
    view = mesh_view(cfg)
    decision = fit_for(remote, name, view, cfg.models.context)
    if not decision.fetch and not force:
        err.write(
            f"meshllm: refused {ref.text}: {decision.reason} (needed {decision.needed_bytes} bytes, "
            f"available {decision.available_bytes}; memory from the {view.source}). --force downloads anyway\n"
        )
        return 3
    err.write(f"meshllm: downloading {ref.text} ({remote.size_bytes} bytes, {decision.reason})\n")
    try:
        path = hub.fetch(remote, Progress(err, remote.size_bytes))
    except HubError as exc:
        err.write(f"\nmeshllm: {exc}\n")
        return 1
    out.write(f"{path}\n")
    return 0


def listing(cfg: NodeConfig, hub: Hub | None = None) -> list[str]:
    """Lines of ``meshllm models``: the catalog and what is in the cache, with sizes."""
    hub = hub or Hub(cfg.models.cache_dir)
    lines = ["CATALOG", f"  {'name':<24} {'source':<70} {'size':>10}  on disk"]
    for name, locate in PACKAGED.items():
        try:
            path = locate()
            size, here = (
                (f"{path.stat().st_size / 1e6:,.0f} MB", str(path)) if path.is_file() else ("?", "no")
            )
        except ModelNotFound as exc:
            size, here = "?", f"no ({exc})"
        lines.append(f"  {name:<24} {'python package':<70} {size:>10}  {here}")
    for name, entry in HUB.items():
        try:
            cached = hub.cached(entry.ref)
        except HubError:
            cached = None
        lines.append(
            f"  {name:<24} {entry.ref.text:<70} {entry.approx_bytes / 1e6:>7,.0f} MB  {cached or 'no'}"
        )
    lines += ["", f"CACHE {hub.cache}"]
    found = sorted(cached_models(hub))
    lines += [f"  {ref:<94} {size / 1e6:>7,.0f} MB" for ref, size in found] or ["  (no GGUF models)"]
    return lines


def cached_models(hub: Hub) -> list[tuple[str, int]]:
    """(``org/repo:file``, bytes) for every GGUF in the cache's snapshots."""
    out = []
    for folder in hub.cache.glob("models--*"):
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        for path in folder.glob("snapshots/*/**/*.gguf"):
            if path.exists():
                rel = path.relative_to(next(p for p in path.parents if p.parent.name == "snapshots"))
                out.append((HubRef(repo, filename=str(rel)).text, path.stat().st_size))
    return out
