"""Pure standby promotion (meshllm/promotion.py), property-tested with hypothesis: which gap a standby
takes, the capacity-weighted race that spreads standbys out, which models count as gaps, and which
of several promoted nodes keeps a model (exactly one: no flapping)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from meshllm import promotion
from meshllm.promotion import (
    GIB,
    Gap,
    Offer,
    gaps_in,
    keeps_promotion,
    one_gap_per_model,
    pick_model_assignment,
    promotion_delay,
    race_key,
)

TIB = 1024 * GIB

node_ids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=8)
model_names = st.text(alphabet="abcdefgh-:.0123456789", min_size=1, max_size=10)
# A few fixed sizes besides arbitrary ones, so equal needs and capacities come up often.
sizes = st.one_of(st.integers(min_value=0, max_value=4 * TIB), st.sampled_from([GIB, 2 * GIB, 24 * GIB]))
# Any capacity at all, down to nothing (the race key floors the rate, so it stays finite).
any_capacity = st.one_of(st.integers(min_value=0, max_value=16 * TIB), st.sampled_from([0, 1, GIB, 24 * GIB]))
# Capacities above the rate floor (1e-3 GiB) where a byte more is still a different float rate.
real_capacity = st.one_of(
    st.integers(min_value=GIB // 512, max_value=16 * TIB), st.sampled_from([GIB, 2 * GIB, 24 * GIB, 80 * GIB])
)
# Capacities of a GiB and a quarter or more: there a key never passes ~36.7, where the delay saturates.
gib_capacity = st.one_of(
    st.integers(min_value=5 * GIB // 4, max_value=16 * TIB), st.sampled_from([2 * GIB, 24 * GIB])
)
demands = st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5]))
reasons = st.sampled_from(["death", "leave"])


def offer_lists(min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[list[Offer]]:
    return st.lists(
        st.builds(Offer, name=model_names, need_bytes=sizes, on_disk=st.booleans()),
        min_size=min_size,
        max_size=max_size,
        unique_by=lambda o: o.name,
    )


def gap_lists(max_size: int = 8) -> st.SearchStrategy[list[Gap]]:
    return st.lists(
        st.builds(
            Gap, name=model_names, reason=st.sampled_from(["death", "leave", "gap"]), demand_per_host=demands
        ),
        max_size=max_size,
        unique_by=lambda g: g.name,
    )


def shuffled(items: list, seed: int) -> list:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def standbys(
    min_size: int, max_size: int, capacity: st.SearchStrategy[int]
) -> st.SearchStrategy[dict[str, int]]:
    """Distinct node ids, each with its capacity."""
    return st.dictionaries(node_ids, capacity, min_size=min_size, max_size=max_size)


# -- which gap a standby takes ------------------------------------------------------------------------


@given(offer_lists(), sizes, gap_lists(), st.data())
def test_picks_only_a_fitting_gap_and_nothing_when_none_fits(
    offers: list[Offer], capacity: int, gaps: list[Gap], data: st.DataObject
) -> None:
    # Mix in offers that are gaps, so that picks are common rather than rare.
    gaps = gaps + [
        Gap(o.name, "gap")
        for o in offers
        if data.draw(st.booleans()) and o.name not in {g.name for g in gaps}
    ]
    choice = pick_model_assignment(offers, capacity, gaps)
    gap_names = {g.name for g in gaps}
    fitting = [o for o in offers if o.name in gap_names and o.need_bytes <= capacity]
    if not fitting:
        assert choice is None
        return
    assert choice is not None
    offer, gap = choice
    assert offer in offers and gap in gaps
    assert offer.name == gap.name, "the gap is the one the offer fills"
    assert offer.need_bytes <= capacity, "never what does not fit"


@given(offer_lists(min_size=1), sizes, gap_lists())
def test_prefers_on_disk_then_demand_per_host_then_name(
    offers: list[Offer], capacity: int, gaps: list[Gap]
) -> None:
    gaps = gaps + [Gap(o.name, "gap", 1.0) for o in offers[::2] if o.name not in {g.name for g in gaps}]
    choice = pick_model_assignment(offers, capacity, gaps)
    by_name = {g.name: g for g in gaps}
    # The same choice, made in stages: on disk if any is, then most demand, then the lowest name.
    pool = [o for o in offers if o.name in by_name and o.need_bytes <= capacity]
    assume(pool)
    if any(o.on_disk for o in pool):
        pool = [o for o in pool if o.on_disk]
    most = max(by_name[o.name].demand_per_host for o in pool)
    pool = [o for o in pool if by_name[o.name].demand_per_host == most]
    expected = min(pool, key=lambda o: o.name)
    assert choice == (expected, by_name[expected.name])


@given(offer_lists(), sizes, gap_lists(), st.integers())
def test_pick_is_independent_of_the_order_of_offers_and_gaps(
    offers: list[Offer], capacity: int, gaps: list[Gap], seed: int
) -> None:
    gaps = gaps + [Gap(o.name, "leave") for o in offers[1::2] if o.name not in {g.name for g in gaps}]
    choice = pick_model_assignment(offers, capacity, gaps)
    assert pick_model_assignment(shuffled(offers, seed), capacity, shuffled(gaps, seed + 1)) == choice
    assert pick_model_assignment(tuple(offers), capacity, tuple(gaps)) == choice


def test_pick_examples() -> None:
    big = Offer("big", 40 * GIB, on_disk=True)
    cold = Offer("cold", 8 * GIB, on_disk=False)
    warm = Offer("warm", 8 * GIB, on_disk=True)
    other = Offer("other", 8 * GIB, on_disk=True)
    gaps = [Gap("big", "death"), Gap("cold", "gap", 5.0), Gap("warm", "leave"), Gap("other", "gap")]
    # Too big for 24 GiB; on disk beats more demand; between equals, the name.
    assert pick_model_assignment([big, cold, warm, other], 24 * GIB, gaps) == (other, gaps[3])
    # Exactly the capacity fits; a byte short does not.
    assert pick_model_assignment([big], 40 * GIB, gaps) == (big, gaps[0])
    assert pick_model_assignment([big], 40 * GIB - 1, gaps) is None
    # More demand per host wins among offers alike on disk.
    busy = [Gap("warm", "gap", 1.0), Gap("other", "gap", 3.0)]
    assert pick_model_assignment([warm, other], 24 * GIB, busy) == (other, busy[1])
    # Not a gap, or nothing offered: nothing to take.
    assert pick_model_assignment([warm], 24 * GIB, [Gap("other", "gap")]) is None
    assert pick_model_assignment([], 24 * GIB, gaps) is None
    assert pick_model_assignment([warm], 24 * GIB, []) is None
    # A cold offer is still taken when it is the only one that fits.
    assert pick_model_assignment([cold, big], 24 * GIB, gaps) == (cold, gaps[1])


def test_a_model_that_lost_its_host_and_is_in_demand_is_taken_for_the_lost_host() -> None:
    warm = Offer("warm", 8 * GIB, on_disk=True)
    other = Offer("other", 8 * GIB, on_disk=True)
    lost_and_wanted = [Gap("warm", "death"), Gap("other", "gap", 2.0), Gap("warm", "demand", 12.0)]
    # The reason is the lost host whichever comes first; the demand still ranks it.
    for gaps in (lost_and_wanted, lost_and_wanted[::-1]):
        assert pick_model_assignment([warm, other], 24 * GIB, gaps) == (warm, Gap("warm", "death", 12.0))
    assert one_gap_per_model([Gap("m", "demand", 11.0), Gap("m", "gap")]) == {"m": Gap("m", "gap", 11.0)}
    assert one_gap_per_model([Gap("m", "leave", 0.0)]) == {"m": Gap("m", "leave", 0.0)}


# -- the race: key and delay --------------------------------------------------------------------------


@given(model_names, node_ids, any_capacity)
def test_race_key_is_deterministic_finite_and_not_negative(model: str, node: str, capacity: int) -> None:
    key = race_key(model, node, capacity)
    assert key == race_key(model, node, capacity)
    assert math.isfinite(key) and key >= 0


@given(model_names, node_ids, gib_capacity, st.floats(min_value=0.01, max_value=3600))
def test_delay_is_deterministic_and_within_the_window(
    model: str, node: str, capacity: int, window: float
) -> None:
    delay = promotion_delay(model, node, capacity, window)
    assert delay == promotion_delay(model, node, capacity, window)
    assert 0 <= delay < window


@given(model_names, node_ids, real_capacity, real_capacity, st.floats(min_value=0.01, max_value=3600))
def test_more_capacity_is_a_strictly_smaller_key_and_no_longer_delay(
    model: str, node: str, c1: int, c2: int, window: float
) -> None:
    assume(c1 != c2)
    small, big = sorted((c1, c2))
    assert race_key(model, node, big) < race_key(model, node, small)
    assert promotion_delay(model, node, big, window) <= promotion_delay(model, node, small, window)


@given(model_names, node_ids, any_capacity, any_capacity, st.floats(min_value=0.01, max_value=3600))
def test_delay_follows_the_key(model: str, node: str, c1: int, c2: int, window: float) -> None:
    # The delay is the key mapped monotonically into the window: the race order is kept.
    k1, k2 = race_key(model, node, c1), race_key(model, node, c2)
    d1, d2 = promotion_delay(model, node, c1, window), promotion_delay(model, node, c2, window)
    if k1 < k2:
        assert d1 <= d2
    assert promotion_delay(model, node, c1, 2 * window) == pytest.approx(2 * d1)


@given(model_names, standbys(2, 12, any_capacity))
def test_one_winner_per_gap(model: str, nodes: dict[str, int]) -> None:
    keys = sorted(race_key(model, node, cap) for node, cap in nodes.items())
    assert keys[0] < keys[1], "the smallest key is unique: one standby takes the gap"


@given(model_names, standbys(1, 8, any_capacity), node_ids, any_capacity, st.lists(model_names, max_size=4))
def test_a_nodes_key_ignores_other_standbys_and_other_models(
    model: str, nodes: dict[str, int], newcomer: str, newcomer_cap: int, others: list[str]
) -> None:
    assume(newcomer not in nodes)
    alone = {node: race_key(model, node, cap) for node, cap in nodes.items()}
    # The same keys, computed across a bigger mesh: more standbys, more models.
    mesh = {**nodes, newcomer: newcomer_cap}
    everywhere = {(m, node): race_key(m, node, cap) for m in [*others, model] for node, cap in mesh.items()}
    assert all(everywhere[model, node] == key for node, key in alone.items())
    # So the winner moves only to a newcomer, and removing a loser leaves it where it was.
    winner = min(alone, key=alone.__getitem__)
    with_newcomer = min(mesh, key=lambda n: race_key(model, n, mesh[n]))
    assert with_newcomer in (winner, newcomer)
    for loser in set(nodes) - {winner}:
        fewer = {n: k for n, k in alone.items() if n != loser}
        assert min(fewer, key=fewer.__getitem__) == winner


def test_twice_the_capacity_wins_about_two_thirds_of_the_races() -> None:
    for big, small in (("node-a", "node-b"), ("node-b", "node-a")):
        wins = sum(
            race_key(f"model-{i}", big, 48 * GIB) < race_key(f"model-{i}", small, 24 * GIB)
            for i in range(3000)
        )
        assert 0.62 <= wins / 3000 <= 0.71, wins
    # Equal capacities: an even split.
    even = sum(
        race_key(f"model-{i}", "node-a", GIB) < race_key(f"model-{i}", "node-b", GIB) for i in range(3000)
    )
    assert 0.45 <= even / 3000 <= 0.55, even


def test_capacities_below_the_rate_floor_race_alike() -> None:
    # The rate is floored at 1e-3 GiB (about 1 MiB), so nothing there divides by zero.
    assert race_key("m", "n", 0) == race_key("m", "n", 1) == race_key("m", "n", GIB // 1000)
    assert race_key("m", "n", GIB // 500) < race_key("m", "n", 0)


def test_small_capacities_keep_the_delay_inside_the_window() -> None:
    for capacity in (1, GIB // 1024, 64 * 1024**2):
        for i in range(200):
            assert promotion_delay(f"m{i}", "node", capacity, 10.0) < 10.0, (capacity, i)


# -- gaps ---------------------------------------------------------------------------------------------

model_sets = st.sets(st.sampled_from([f"m{i}" for i in range(10)]), max_size=10)


@given(
    model_sets,
    model_sets,
    model_sets,
    model_sets,
    st.dictionaries(st.sampled_from([f"m{i}" for i in range(12)]), reasons),
)
def test_gaps_are_offered_unserved_unclaimed_models_that_were_lost_or_wanted(
    offered: set[str], served: set[str], wanted: set[str], claimed: set[str], lost: dict[str, str]
) -> None:
    gaps = gaps_in(offered, served, wanted, claimed, lost)
    names = [g.name for g in gaps]
    assert names == sorted(set(names)), "sorted by name, each once"
    for g in gaps:
        assert g.name in offered and g.name not in served and g.name not in claimed
        assert g.reason == lost.get(g.name, "gap"), "a lost model carries why; a wanted one is a gap"
    assert set(names) == (offered - served - claimed) & (set(lost) | wanted)


def test_gaps_examples() -> None:
    offered = {"a", "b", "c", "d", "e", "f"}
    gaps = gaps_in(
        offered,
        served={"a"},
        wanted_unserved={"c", "d", "x"},
        claimed={"e"},
        lost={"a": "death", "b": "leave", "d": "death", "e": "leave", "y": "death"},
    )
    # a is served again, e is claimed, f nobody wants, x and y are not offered; d is lost and wanted.
    assert gaps == [Gap("b", "leave"), Gap("c", "gap"), Gap("d", "death")]
    assert gaps_in(set(), {"a"}, {"a"}, set(), {"a": "death"}) == []


# -- keeping a promotion: no flapping -----------------------------------------------------------------


@given(model_names, node_ids, any_capacity)
def test_alone_a_promoted_node_keeps_the_model(model: str, node: str, capacity: int) -> None:
    assert keeps_promotion(model, node, capacity, {})


@given(model_names, node_ids, any_capacity, standbys(1, 6, any_capacity), st.data())
def test_a_configured_host_outranks_every_promoted_node(
    model: str, node: str, capacity: int, others: dict[str, int], data: st.DataObject
) -> None:
    assume(node not in others)
    configured = data.draw(st.sampled_from(sorted(others)))
    hosts = {n: (cap, n != configured) for n, cap in others.items()}
    assert not keeps_promotion(model, node, capacity, hosts)


@given(model_names, standbys(2, 6, any_capacity))
def test_exactly_one_of_the_promoted_nodes_keeps_the_model(model: str, nodes: dict[str, int]) -> None:
    keeps = [
        node
        for node, cap in nodes.items()
        if keeps_promotion(model, node, cap, {n: (c, True) for n, c in nodes.items() if n != node})
    ]
    assert len(keeps) == 1, keeps
    # The keeper is the node that would have won the race for the gap.
    assert keeps[0] == min(nodes, key=lambda n: race_key(model, n, nodes[n]))


def test_equal_keys_go_to_the_lowest_node_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(promotion, "race_key", lambda model, node, cap: 1.0)
    nodes = {"c": GIB, "a": GIB, "b": 2 * GIB}
    keeps = [
        n
        for n in nodes
        if keeps_promotion("m", n, nodes[n], {o: (c, True) for o, c in nodes.items() if o != n})
    ]
    assert keeps == ["a"]


def test_keeps_promotion_examples() -> None:
    model = "llama"
    big, small = ("node-big", 48 * GIB), ("node-small", 8 * GIB)
    a_wins = race_key(model, *big) < race_key(model, *small)
    assert keeps_promotion(model, *big, {small[0]: (small[1], True)}) == a_wins
    assert keeps_promotion(model, *small, {big[0]: (big[1], True)}) == (not a_wins)
    # The model's own host is back: both step down, whatever the race.
    back = {"host": (1, False)}
    assert not keeps_promotion(model, *big, {**back, small[0]: (small[1], True)})
    assert not keeps_promotion(model, *small, {**back, big[0]: (big[1], True)})


def test_equal_standbys_land_apart_whatever_their_size() -> None:
    # Two standbys of the same size must rarely look within 5 % of the window of each other: the first
    # one's claim has to reach the active nodes before the second looks.
    for capacity in (GIB, 12 * GIB, 80 * GIB):
        close = sum(
            abs(promotion_delay(f"m{i}", "a", capacity, 1.0) - promotion_delay(f"m{i}", "b", capacity, 1.0))
            < 0.05
            for i in range(2000)
        )
        assert close / 2000 < 0.2, (capacity, close)
