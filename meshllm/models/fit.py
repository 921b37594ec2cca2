"""Does a model fit, before any byte of it is fetched, and how much of a node's memory do several
models take? Pure functions: capacity, peers and sizes come from outside.

A model needs its weights plus the KV cache of the configured context, times the same 1.1 headroom
placement uses for running it (:data:`meshllm.placement.SOLO_HEADROOM`). A node's models are
planned against one budget in config order: each takes its need from what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshllm.placement import needed_bytes


def model_need(weights_bytes: int, kv_bytes: int) -> int:
    """Bytes of memory a model takes to run: (weights + KV cache) x headroom."""
    return needed_bytes(weights_bytes + kv_bytes)


@dataclass(frozen=True)
class FitDecision:
    """Whether to fetch a model here: solo, as part of a split, or not at all (with the numbers)."""

    fetch: bool
    how: str  # "solo" | "split" | "refused"
    needed_bytes: int
    available_bytes: int
    reason: str


def download_fit(need: int, free_here: int, split_peers_bytes: Sequence[int]) -> FitDecision:
    """Fetch when the model fits what this node has left, or when this node plus the peers that
    serve or want the same model reach its need; otherwise refuse, saying why."""
    if need <= free_here:
        return FitDecision(True, "solo", need, free_here, "fits this node")
    group = free_here + sum(split_peers_bytes)
    if split_peers_bytes and group >= need:
        return FitDecision(True, "split", need, group, f"fits a split with {len(split_peers_bytes)} peer(s)")
    if split_peers_bytes:
        reason = f"needs {need} bytes; this node has {free_here} free and {len(split_peers_bytes)} split peer(s) add {group - free_here}"
    else:
        reason = f"needs {need} bytes; this node has {free_here} free and no peer serves or wants this model to split it"
    return FitDecision(False, "refused", need, group, reason)


@dataclass(frozen=True)
class Allocation:
    """One model's place in a node's budget."""

    name: str
    need: int
    fits: bool
    free_before: int


def allocate(needs: Sequence[tuple[str, int]], capacity: int) -> list[Allocation]:
    """Models in priority order against one budget: each that fits takes its need from what is left;
    one that does not fit takes nothing (later, smaller ones may still fit)."""
    free = capacity
    out = []
    for name, need in needs:
        fits = need <= free
        out.append(Allocation(name, need, fits, free))
        if fits:
            free -= need
    return out
