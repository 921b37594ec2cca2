"""Pure standby decisions: which gap in the mesh a standby node takes, when, and when a promoted node
steps back. No I/O: every standby computes the same answers from the same routing table.

- A *gap* is a model the mesh wants or had and no host now serves: its last host died or left, or an
  active node wants it and nobody serves it.
- :func:`pick_model_assignment` chooses what one standby takes: only what fits its memory, files
  already on disk first, then the most demand per host, then the name.
- :func:`promotion_delay` spreads standbys out so that in the common case exactly one takes each
  gap: an exponential race weighted by capacity (a standby with twice the memory wins twice as
  often), deterministic per (model, node). Before promoting, a standby looks at a fresh table and
  stands down if another node has already claimed the model.
- :func:`keeps_promotion` settles two promoted nodes for one model without flapping: the one whose
  race key is smaller keeps it, and a node that serves the model by its own configuration always
  outranks a promoted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Offer:
    """A model a standby can serve."""

    name: str
    need_bytes: int
    on_disk: bool


@dataclass(frozen=True)
class Gap:
    """A model without a host, and why (death, leave, gap, demand)."""

    name: str
    reason: str
    demand_per_host: float = 0.0


def pick_model_assignment(
    offers: Sequence[Offer], capacity_bytes: int, gaps: Sequence[Gap]
) -> tuple[Offer, Gap] | None:
    """The gap this standby takes, with the offer that fills it; None when it can fill none. A model
    may be a gap twice, for a lost host and for its demand: see :func:`one_gap_per_model`."""
    by_name = one_gap_per_model(gaps)
    fitting = [o for o in offers if o.name in by_name and o.need_bytes <= capacity_bytes]
    if not fitting:
        return None
    best = min(fitting, key=lambda o: (not o.on_disk, -by_name[o.name].demand_per_host, o.name))
    return best, by_name[best.name]


def one_gap_per_model(gaps: Sequence[Gap]) -> dict[str, Gap]:
    """Each model's gap, by name. Where a model is a gap both for a reason of its own (its host died
    or left, or an active node wants it) and for its demand, that reason is kept, with the demand
    figure for ranking, whatever the order: the node that takes it says it replaces a lost host, and
    steps back when the model's own host returns (a demand promotion would stay while demand lasts,
    beside that host)."""
    out: dict[str, Gap] = {}
    for gap in gaps:
        seen = out.get(gap.name)
        if seen is None:
            out[gap.name] = gap
            continue
        reason = seen.reason if gap.reason == "demand" else gap.reason
        out[gap.name] = Gap(gap.name, reason, max(seen.demand_per_host, gap.demand_per_host))
    return out


def _unit(model: str, node_id: str) -> float:
    """A number in (0, 1], fixed per (model, node)."""
    digest = hashlib.blake2b(f"{model}\0{node_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / 2**64


def race_key(model: str, node_id: str, capacity_bytes: int) -> float:
    """An exponential clock with rate = capacity in GiB: among standbys the smallest key wins, each
    with probability proportional to its capacity."""
    rate = max(capacity_bytes / GIB, 1e-3)
    return -math.log(_unit(model, node_id)) / rate


REFERENCE_BYTES = 8 * GIB


def promotion_delay(model: str, node_id: str, capacity_bytes: int, window_s: float) -> float:
    """Seconds this standby waits before taking a gap: spread over [0, window_s) by a number fixed
    per (model, node), earlier for more capacity (``u ** w``, ``w`` = sqrt(capacity / 8 GiB) within
    [0.5, 2]). Spread, not squeezed: standbys of any size land apart, so the first one's claim reaches
    the active nodes before the next one looks (mapping the race key itself put every standby with
    tens of GiB within a few hundred ms of each other, and two promoted)."""
    weight = min(max(math.sqrt(capacity_bytes / REFERENCE_BYTES), 0.5), 2.0)
    delay = window_s * float(_unit(model, node_id) ** weight)
    return min(delay, math.nextafter(window_s, 0.0))


def gaps_in(
    offered: set[str], served: set[str], wanted_unserved: set[str], claimed: set[str], lost: Mapping[str, str]
) -> list[Gap]:
    """The gaps a standby could fill: models it offers that nobody serves and nobody has claimed,
    either lost (``lost``: model -> death | leave) or wanted by an active node (reason gap)."""
    out = []
    for name in sorted(offered - served - claimed):
        if name in lost:
            out.append(Gap(name, lost[name]))
        elif name in wanted_unserved:
            out.append(Gap(name, "gap"))
    return out


def keeps_promotion(
    model: str, own_id: str, own_capacity: int, hosts: Mapping[str, tuple[int, bool]]
) -> bool:
    """Whether a node promoted for ``model`` is still needed, given the other nodes that serve it
    (node id -> (capacity, promoted)). Needed when no other node serves it, or when every other
    server is promoted too and this node wins their race."""
    if not hosts:
        return True
    if any(not promoted for _, promoted in hosts.values()):
        return False  # the model's own host (by configuration) is back
    mine = race_key(model, own_id, own_capacity)
    return all(
        mine < race_key(model, node, cap) or (mine == race_key(model, node, cap) and own_id < node)
        for node, (cap, _) in hosts.items()
    )


def demand_gaps(
    offered: set[str],
    hosts: Mapping[str, int],
    demand: Mapping[str, float],
    nodes: int,
    ratio: float,
    min_per_min: float,
) -> list[Gap]:
    """Served models that one more host would help: demand per host at least ``ratio`` times the
    mesh's average per node - its requests per minute over the nodes that could share them, the active
    nodes and this standby (``nodes``) - and at least ``min_per_min`` requests a minute. With a single
    served model the ratio test only asks for at least ``ratio`` such nodes, so ``min_per_min`` decides
    (bench_promotion --demand: promotion once the one-minute count reached 10)."""
    average = sum(demand.values()) / max(nodes, 1)
    out = []
    for name in sorted(offered):
        count = hosts.get(name, 0)
        if not count:  # asked for, and nobody serves it: the demand alone decides
            if demand.get(name, 0.0) >= min_per_min:
                out.append(Gap(name, "demand", demand[name]))
            continue
        per_host = demand.get(name, 0.0) / count
        if per_host >= min_per_min and per_host >= ratio * average:
            out.append(Gap(name, "demand", per_host))
    return out


def demand_needs(demand_per_min: float, hosts: int, min_per_min: float) -> bool:
    """Whether a model's demand still warrants the hosts it has (a demand-promoted node among them)."""
    return hosts > 0 and demand_per_min / hosts >= min_per_min
