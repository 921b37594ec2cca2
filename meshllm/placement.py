"""Pure placement decisions: who hosts a model, whether it runs solo or split, how the split is cut,
and which host a client uses. No I/O: every node computes the same answer from the same view.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SOLO_HEADROOM = 1.1
"""A model runs solo on a node whose VRAM is at least this many times the model's size."""


@dataclass(frozen=True)
class Candidate:
    """A node that wants to serve a model, as placement sees it."""

    node_id: str
    vram_bytes: int


def needed_bytes(model_bytes: int) -> int:
    return int(model_bytes * SOLO_HEADROOM)


def fits_solo(vram_bytes: int, model_bytes: int) -> bool:
    return vram_bytes >= needed_bytes(model_bytes)


def host_order(candidates: list[Candidate]) -> list[Candidate]:
    """Most VRAM first; equal VRAM by node id, so every node agrees."""
    return sorted(candidates, key=lambda c: (-c.vram_bytes, c.node_id))


def choose_host(candidates: list[Candidate]) -> Candidate | None:
    ordered = host_order(candidates)
    return ordered[0] if ordered else None


@dataclass(frozen=True)
class SplitPlan:
    """A model spread over a host and workers; ``fractions`` follow ``[host, *workers]``."""

    host: str
    workers: tuple[str, ...]
    fractions: tuple[float, ...]


@dataclass(frozen=True)
class Shortfall:
    """Not enough VRAM in the whole group."""

    needed_bytes: int
    available_bytes: int


SPLIT_STEPS = 1000
"""Fractions are whole thousandths."""


def tensor_split(vrams: list[int]) -> tuple[float, ...]:
    """Fractions proportional to VRAM in thousandths that sum to 1, each within 1/1000 of its exact
    share (largest remainder: each gets its share rounded down, the thousandths left over go to the
    largest remainders, ties to the earlier entry, so the host first)."""
    total = sum(vrams)
    if total <= 0:
        raise ValueError("tensor split needs positive VRAM")
    steps = [v * SPLIT_STEPS // total for v in vrams]
    left = SPLIT_STEPS - sum(steps)
    by_remainder = sorted(range(len(vrams)), key=lambda i: (-(vrams[i] * SPLIT_STEPS % total), i))
    for i in by_remainder[:left]:
        steps[i] += 1
    return tuple(s / SPLIT_STEPS for s in steps)


def plan_split(candidates: list[Candidate], model_bytes: int, force: bool) -> SplitPlan | Shortfall:
    """The host (most VRAM) plus as few workers as reach the headroom (every candidate when forced)."""
    ordered = host_order(candidates)
    needed = needed_bytes(model_bytes)
    available = sum(c.vram_bytes for c in ordered)
    if not ordered or available < needed:
        return Shortfall(needed_bytes=needed, available_bytes=available)
    host, rest = ordered[0], ordered[1:]
    if force:
        chosen = rest
    else:
        chosen, total = [], host.vram_bytes
        for c in rest:
            if total >= needed:
                break
            chosen.append(c)
            total += c.vram_bytes
    return SplitPlan(
        host=host.node_id,
        workers=tuple(c.node_id for c in chosen),
        fractions=tensor_split([c.vram_bytes for c in [host, *chosen]]),
    )


def _score(client_id: str, model: str, host: str) -> bytes:
    return hashlib.blake2b(f"{client_id}\0{model}\0{host}".encode(), digest_size=8).digest()


def rank_hosts(client_id: str, model: str, hosts: list[str]) -> list[str]:
    """Rendezvous hashing: hosts in this client's preference order for a model. Each (client, model)
    keeps its first host while that host stays, and clients spread evenly over hosts."""
    return sorted(hosts, key=lambda h: (_score(client_id, model, h), h), reverse=True)


def host_for_client(client_id: str, model: str, hosts: list[str]) -> str | None:
    ranked = rank_hosts(client_id, model, hosts)
    return ranked[0] if ranked else None
