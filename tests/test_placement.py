"""Pure placement (meshllm/placement.py), property-tested with hypothesis: the 1.1x fit rule, host
choice and its tie-breaks, split plans and their fractions, and rendezvous ranking of hosts."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from meshllm.placement import (
    SOLO_HEADROOM,
    Candidate,
    Shortfall,
    SplitPlan,
    choose_host,
    fits_solo,
    host_for_client,
    host_order,
    needed_bytes,
    plan_split,
    rank_hosts,
    tensor_split,
)

GIB = 1024**3
TIB = 1024 * GIB

node_ids = st.text(alphabet="0123456789abcdef", min_size=1, max_size=8)
# A few fixed sizes besides arbitrary ones, so equal VRAM (the tie-break) comes up often.
vram = st.one_of(st.integers(min_value=1, max_value=4 * TIB), st.sampled_from([GIB, 2 * GIB, 24 * GIB]))
model_sizes = st.integers(min_value=0, max_value=16 * TIB)


def candidate_lists(min_size: int = 1, max_size: int = 16) -> st.SearchStrategy[list[Candidate]]:
    return st.lists(
        st.builds(Candidate, node_id=node_ids, vram_bytes=vram),
        min_size=min_size,
        max_size=max_size,
        unique_by=lambda c: c.node_id,
    )


def shuffled(items: list[Candidate], seed: int) -> list[Candidate]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


# -- fit: the 1.1x rule -------------------------------------------------------------------------------


def test_headroom_is_ten_percent() -> None:
    assert SOLO_HEADROOM == 1.1
    assert needed_bytes(100) == 110 and needed_bytes(GIB) == int(1.1 * GIB)
    assert fits_solo(110, 100) and not fits_solo(109, 100)


@given(st.integers(min_value=0, max_value=64 * TIB))
def test_needed_bytes_is_exactly_eleven_tenths_rounded_down(model: int) -> None:
    # Exact (no float drift) for any model up to 64 TiB, and never less than the model itself.
    assert needed_bytes(model) == 11 * model // 10
    assert needed_bytes(model) >= model


@given(model_sizes, model_sizes)
def test_needed_bytes_is_monotonic(m1: int, m2: int) -> None:
    small, big = sorted((m1, m2))
    assert needed_bytes(small) <= needed_bytes(big)


@given(vram, model_sizes)
def test_fits_solo_is_vram_against_needed_bytes(v: int, model: int) -> None:
    assert fits_solo(v, model) == (v >= needed_bytes(model))
    # 10 % headroom, to the byte: enough VRAM fits, short of 1.1x (by a whole byte) does not.
    if 10 * v >= 11 * model:
        assert fits_solo(v, model)
    if 10 * (v + 1) <= 11 * model:
        assert not fits_solo(v, model)


@given(vram, st.integers(min_value=0, max_value=TIB), model_sizes, st.integers(min_value=0, max_value=TIB))
def test_fits_solo_is_monotonic(v: int, more_vram: int, model: int, bigger: int) -> None:
    if fits_solo(v, model):
        assert fits_solo(v + more_vram, model), "more VRAM still fits"
        assert fits_solo(v, max(0, model - bigger)), "a smaller model still fits"
    else:
        assert not fits_solo(v, model + bigger), "a bigger model does not fit either"


# -- host choice ------------------------------------------------------------------------------------


@given(candidate_lists())
def test_host_is_most_vram_then_lowest_node_id(cands: list[Candidate]) -> None:
    host = choose_host(cands)
    assert host is not None and host in cands
    most = max(c.vram_bytes for c in cands)
    assert host.vram_bytes == most
    assert host.node_id == min(c.node_id for c in cands if c.vram_bytes == most)


@given(candidate_lists(), st.integers())
def test_host_order_is_a_total_order_independent_of_input_order(cands: list[Candidate], seed: int) -> None:
    ordered = host_order(cands)
    assert sorted(ordered, key=lambda c: c.node_id) == sorted(cands, key=lambda c: c.node_id)
    assert all(
        (a.vram_bytes, b.node_id) > (b.vram_bytes, a.node_id) for a, b in itertools.pairwise(ordered)
    ), "strictly most VRAM first, equal VRAM by node id"
    assert host_order(shuffled(cands, seed)) == ordered
    assert choose_host(shuffled(cands, seed)) == ordered[0]


def test_equal_vram_ties_go_to_the_lowest_node_id() -> None:
    cands = [Candidate("c", GIB), Candidate("a", GIB), Candidate("b", GIB), Candidate("z", GIB - 1)]
    assert choose_host(cands) == Candidate("a", GIB)
    assert [c.node_id for c in host_order(cands)] == ["a", "b", "c", "z"]


def test_no_candidates_no_host() -> None:
    assert choose_host([]) is None
    assert host_order([]) == []


# -- split plans --------------------------------------------------------------------------------------


@given(candidate_lists(min_size=0), model_sizes, st.booleans())
def test_shortfall_exactly_when_the_group_lacks_the_headroom(
    cands: list[Candidate], model: int, force: bool
) -> None:
    plan = plan_split(cands, model, force)
    available = sum(c.vram_bytes for c in cands)
    if not cands or available < needed_bytes(model):
        assert plan == Shortfall(needed_bytes=needed_bytes(model), available_bytes=available)
    else:
        assert isinstance(plan, SplitPlan)


@given(candidate_lists(), model_sizes, st.booleans(), st.integers())
def test_plan_is_independent_of_input_order(
    cands: list[Candidate], model: int, force: bool, seed: int
) -> None:
    assert plan_split(shuffled(cands, seed), model, force) == plan_split(cands, model, force)


@given(candidate_lists(), model_sizes)
def test_workers_are_added_until_the_group_reaches_the_need(cands: list[Candidate], model: int) -> None:
    plan = plan_split(cands, model, force=False)
    assume(isinstance(plan, SplitPlan))
    assert isinstance(plan, SplitPlan)
    ordered = host_order(cands)
    by_id = {c.node_id: c for c in cands}
    assert plan.host == ordered[0].node_id
    # The workers are the next nodes by VRAM: the biggest first, so as few as possible.
    assert list(plan.workers) == [c.node_id for c in ordered[1 : 1 + len(plan.workers)]]
    group = [plan.host, *plan.workers]
    need = needed_bytes(model)
    assert sum(by_id[n].vram_bytes for n in group) >= need, "the group reaches the need"
    assert sum(by_id[n].vram_bytes for n in group[:-1]) < need or not plan.workers, "the last one was needed"
    if fits_solo(ordered[0].vram_bytes, model):
        assert plan.workers == ()


@given(candidate_lists(), model_sizes)
def test_forced_split_takes_every_node(cands: list[Candidate], model: int) -> None:
    plan = plan_split(cands, model, force=True)
    assume(isinstance(plan, SplitPlan))
    assert isinstance(plan, SplitPlan)
    assert [plan.host, *plan.workers] == [c.node_id for c in host_order(cands)]


@given(candidate_lists(), model_sizes, st.booleans())
def test_plan_fractions_follow_the_group_vram(cands: list[Candidate], model: int, force: bool) -> None:
    plan = plan_split(cands, model, force)
    assume(isinstance(plan, SplitPlan))
    assert isinstance(plan, SplitPlan)
    by_id = {c.node_id: c for c in cands}
    assert plan.fractions == tensor_split([by_id[n].vram_bytes for n in (plan.host, *plan.workers)])


def test_split_examples() -> None:
    big, small = Candidate("a", 2 * GIB), Candidate("b", GIB)
    assert plan_split([small, big], int(2.5 * GIB), force=False) == SplitPlan("a", ("b",), (0.667, 0.333))
    assert plan_split([small, big], GIB, force=True) == SplitPlan("a", ("b",), (0.667, 0.333))
    assert plan_split([small, big], GIB, force=False) == SplitPlan("a", (), (1.0,))
    assert plan_split([big], GIB, force=True) == SplitPlan("a", (), (1.0,))
    # Three nodes with 40 % of the model each: two are short of 1.1x, three are enough.
    model = 10 * GIB
    three = [Candidate(n, 4 * GIB) for n in "cba"]
    assert plan_split(three[:2], model, force=False) == Shortfall(needed_bytes(model), 8 * GIB)
    assert plan_split(three, model, force=False) == SplitPlan("a", ("b", "c"), (0.334, 0.333, 0.333))
    assert plan_split([], model, force=True) == Shortfall(needed_bytes(model), 0)


def test_split_boundaries_to_the_byte() -> None:
    # A 100-byte model needs 110 bytes. Exactly 110 in the group is enough; 109 is not.
    a, b, c = Candidate("a", 60), Candidate("b", 50), Candidate("c", 40)
    assert plan_split([a, b, c], 100, force=False) == SplitPlan("a", ("b",), (0.545, 0.455))
    assert plan_split([a, Candidate("b", 49)], 100, force=False) == Shortfall(110, 109)
    assert plan_split([Candidate("a", 60), Candidate("b", 50)], 100, force=False) == SplitPlan(
        "a", ("b",), (0.545, 0.455)
    )
    assert plan_split([Candidate("a", 110), b], 100, force=False) == SplitPlan("a", (), (1.0,))


# -- tensor split -------------------------------------------------------------------------------------

vram_lists = st.lists(st.integers(min_value=1, max_value=4 * TIB), min_size=1, max_size=64)


@given(vram_lists)
def test_fractions_are_thousandths_that_sum_to_one(vrams: list[int]) -> None:
    fractions = tensor_split(vrams)
    assert len(fractions) == len(vrams)
    assert sum(fractions) == pytest.approx(1.0, abs=1e-9)
    for f in fractions:
        assert 0.0 <= f <= 1.0
        assert f == round(f * 1000) / 1000, f"{f} is not a whole thousandth (llama.cpp gets it as text)"


@given(vram_lists)
def test_fractions_follow_vram_proportionally(vrams: list[int]) -> None:
    fractions = tensor_split(vrams)
    total = sum(vrams)
    for v, f in zip(vrams, fractions, strict=True):
        assert abs(f - v / total) < 0.001 + 1e-12, f"share {v / total:.5f} got {f} of {vrams}"
    for x in range(len(vrams)):
        for y in range(len(vrams)):
            if vrams[x] > vrams[y]:
                assert fractions[x] >= fractions[y], "more VRAM never gets a smaller fraction"


def test_many_equal_nodes_leave_the_host_no_more_than_its_share() -> None:
    # 16 equal nodes: each share is 0.0625. Rounding every worker and giving the host the rest made
    # the host 0.070, 12 % over its share - more than the 10 % headroom a split plan keeps.
    fractions = tensor_split([GIB] * 16)
    assert max(fractions) - 0.0625 < 0.001
    # 60 nodes where every worker rounds up: the host's rest went negative (-0.003).
    fractions = tensor_split([206] + [166] * 59)
    assert min(fractions) >= 0 and fractions[0] >= fractions[1]


def test_tensor_split_needs_vram() -> None:
    with pytest.raises(ValueError):
        tensor_split([])
    with pytest.raises(ValueError):
        tensor_split([0, 0])


# -- rendezvous ranking of hosts ------------------------------------------------------------------------

host_lists = st.lists(node_ids, min_size=1, max_size=12, unique=True)
clients = st.text(min_size=1, max_size=16)
models = st.sampled_from(["tiny", "smollm2-135m", "llama-70b"])


@given(clients, models, host_lists, st.integers())
def test_ranking_is_a_permutation_independent_of_input_order(
    client: str, model: str, hosts: list[str], seed: int
) -> None:
    ranked = rank_hosts(client, model, hosts)
    assert sorted(ranked) == sorted(hosts)
    mixed = list(hosts)
    random.Random(seed).shuffle(mixed)
    assert rank_hosts(client, model, mixed) == ranked
    assert host_for_client(client, model, mixed) == ranked[0]


@given(clients, models, host_lists, st.data())
def test_removing_a_host_keeps_the_order_of_the_others(
    client: str, model: str, hosts: list[str], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from(hosts))
    before = rank_hosts(client, model, hosts)
    after = rank_hosts(client, model, [h for h in hosts if h != gone])
    assert after == [h for h in before if h != gone]
    if before[0] != gone:
        assert host_for_client(client, model, after) == before[0], "only the removed host's keys move"


@given(clients, models, host_lists, node_ids)
def test_adding_a_host_moves_a_key_only_to_the_new_host(
    client: str, model: str, hosts: list[str], new: str
) -> None:
    assume(new not in hosts)
    before = rank_hosts(client, model, hosts)
    after = rank_hosts(client, model, [*hosts, new])
    assert [h for h in after if h != new] == before
    assert host_for_client(client, model, [*hosts, new]) in (before[0], new)


def test_removing_a_host_moves_only_its_clients_and_spreads_them() -> None:
    hosts = [f"host-{i}" for i in range(4)]
    keys = [f"client-{i}" for i in range(4000)]
    before = {k: host_for_client(k, "tiny", hosts) for k in keys}
    counts = {h: sum(1 for v in before.values() if v == h) for h in hosts}
    assert all(800 <= n <= 1200 for n in counts.values()), f"uneven spread over hosts: {counts}"
    after = {k: host_for_client(k, "tiny", hosts[1:]) for k in keys}
    moved = {k for k in keys if after[k] != before[k]}
    assert moved == {k for k in keys if before[k] == "host-0"}
    regained = {h: sum(1 for k in moved if after[k] == h) for h in hosts[1:]}
    assert all(n >= len(moved) // 5 for n in regained.values()), f"moved clients pile up: {regained}"


def test_ranking_is_the_same_in_every_process() -> None:
    # blake2b of "client\0model\0host", not Python's per-process hash(): pinned values, so a passive
    # node keeps its host across restarts and versions.
    assert rank_hosts("client-1", "tiny", ["a", "b", "c", "d"]) == ["a", "c", "d", "b"]
    assert rank_hosts("client-2", "smollm2-135m", ["d", "c", "b", "a"]) == ["a", "d", "b", "c"]
    assert host_for_client("client-1", "tiny", []) is None
