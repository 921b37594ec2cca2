"""Tests for meshllm.peerview: merging gossip, the dead set and the candidates to dial (pure, explicit now)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.peerview import PeerView
from meshllm.wire.announcement import announcement_payload, refusal
from meshllm.wire.messages import PeerAnnouncement
from tests.signing import identity, nid, signed

OWN, A, B, C = nid("own"), nid("a"), nid("b"), nid("c")
TTL = 30.0


def ann(
    name: str,
    incarnation: int = 1,
    version: int = 0,
    role: str = "active",
    addrs: tuple[str, ...] | None = None,
    models: tuple[str, ...] = (),
) -> PeerAnnouncement:
    """The announcement of the test node called ``name``, signed by it."""
    return signed(
        PeerAnnouncement(
            node_id=nid(name),
            name=f"name-{name}",
            role=role,
            addrs=addrs if addrs is not None else (f"{name}.example:7000",),
            vram_bytes=1 << 30,
            models=models,
            incarnation=incarnation,
            version=version,
        )
    )


@pytest.fixture
def view() -> PeerView:
    return PeerView(OWN, dead_ttl_s=TTL)


# -- direct merges ----------------------------------------------------------------------------------------


def test_direct_merge_adds_a_peer(view: PeerView) -> None:
    a = ann("a")
    change = view.merge_direct(A, (a,), now=10.0)
    assert change.joined == [a]
    assert change.updated == [] and change.new_candidates == []
    assert view.peers == {A: a}
    assert view.last_seen == {A: 10.0}
    assert view.candidates == {}


def test_direct_merge_newest_wins_and_older_is_ignored(view: PeerView) -> None:
    view.merge_direct(A, (ann("a", 1, 0),), now=1.0)
    newer = ann("a", 1, 1, models=("m",))
    change = view.merge_direct(A, (newer,), now=2.0)
    assert change.updated == [newer] and change.joined == []
    assert view.peers[A] == newer

    restarted = ann("a", 2, 0)
    change = view.merge_direct(A, (restarted,), now=3.0)
    assert change.updated == [restarted]
    assert view.peers[A] == restarted

    for stale in (ann("a", 1, 9), ann("a", 2, 0), ann("a", 0, 0)):
        change = view.merge_direct(A, (stale,), now=4.0)
        assert change.joined == [] and change.updated == []
        assert view.peers[A] == restarted
    assert view.last_seen[A] == 4.0  # it still answered, so it was seen


def test_direct_merge_without_own_announcement_does_not_add_the_peer(view: PeerView) -> None:
    change = view.merge_direct(A, (ann("b"),), now=1.0)
    assert A not in view.peers and change.joined == []
    assert change.new_candidates == [B]


def test_direct_merge_from_non_active_node_is_not_a_peer(view: PeerView) -> None:
    for role in ("client", "standby"):
        change = view.merge_direct(C, (ann("c", role=role),), now=1.0)
        assert change.joined == []
        assert C not in view.peers and C not in view.candidates


def test_direct_merge_clears_the_candidate(view: PeerView) -> None:
    view.merge_direct(A, (ann("a"), ann("b")), now=1.0)
    assert B in view.candidates
    change = view.merge_direct(B, (ann("b"),), now=2.0)
    assert change.joined == [ann("b")]
    assert B not in view.candidates


# -- hearsay ---------------------------------------------------------------------------------------------


def test_hearsay_about_unknown_node_is_a_candidate_not_a_peer(view: PeerView) -> None:
    b = ann("b", addrs=("10.0.0.2:1",))
    change = view.merge_direct(A, (ann("a"), b), now=1.0)
    assert change.joined == [ann("a")]
    assert change.new_candidates == [B]
    assert B not in view.peers
    assert view.candidates[B].addrs == ("10.0.0.2:1",)
    assert view.candidates[B].seed is False
    # Hearing of it again updates its addresses, without announcing a new candidate.
    change = view.merge_direct(A, (ann("a"), ann("b", addrs=("10.0.0.3:1",))), now=2.0)
    assert change.new_candidates == []
    assert view.candidates[B].addrs == ("10.0.0.3:1",)


def test_hearsay_about_own_id_is_ignored(view: PeerView) -> None:
    change = view.merge_direct(A, (ann("a"), ann("own", 99)), now=1.0)
    assert OWN not in view.peers and OWN not in view.candidates
    assert change.new_candidates == []


def test_hearsay_with_non_active_roles_is_ignored(view: PeerView) -> None:
    change = view.merge_direct(A, (ann("a"), ann("c", role="client"), ann("s", role="standby")), now=1.0)
    assert change.new_candidates == []
    assert set(view.peers) == {A}
    assert view.candidates == {}


def test_hearsay_updates_known_peer_in_same_incarnation(view: PeerView) -> None:
    view.merge_direct(B, (ann("b", 1, 0),), now=1.0)
    newer = ann("b", 1, 3, models=("m",))
    change = view.merge_direct(A, (ann("a"), newer), now=2.0)
    assert change.updated == [newer]
    assert view.peers[B] == newer
    assert view.last_seen[B] == 1.0  # hearsay is not contact
    # Older hearsay changes nothing.
    change = view.merge_direct(A, (ann("a"), ann("b", 1, 1)), now=3.0)
    assert change.updated == [] and view.peers[B] == newer


def test_hearsay_of_a_restart_makes_a_candidate_and_keeps_the_old_peer(view: PeerView) -> None:
    old = ann("b", 1, 5)
    view.merge_direct(B, (old,), now=1.0)
    change = view.merge_direct(A, (ann("a"), ann("b", 2, 0, addrs=("new:1",))), now=2.0)
    assert change.updated == [] and change.new_candidates == [B]
    assert view.peers[B] == old
    assert view.candidates[B].addrs == ("new:1",)


# -- signatures --------------------------------------------------------------------------------------------------


def test_forged_hearsay_with_a_huge_version_is_refused_and_real_updates_still_apply(view: PeerView) -> None:
    """Issue #12: a member relays another node's record pushed far ahead, serving a fake model."""
    view.merge_direct(B, (ann("b", 1, 0),), now=1.0)
    forged = replace(ann("b", 1, 0), version=10**9, serving=("fake",))
    change = view.merge_direct(A, (ann("a"), forged), now=2.0)
    assert change.refused == [(forged, "bad signature")]
    assert change.updated == [] and view.peers[B] == ann("b", 1, 0)

    real = ann("b", 1, 1, models=("m",))
    change = view.merge_direct(A, (ann("a"), real), now=3.0)
    assert change.updated == [real] and view.peers[B] == real


def test_a_record_re_signed_by_the_relayer_is_refused(view: PeerView) -> None:
    theirs = replace(ann("b"), version=10**9, public_key=identity("a").public_key)
    forged = replace(theirs, signature=identity("a").sign(announcement_payload(theirs)))
    change = view.merge_direct(A, (ann("a"), forged), now=1.0)
    assert change.refused == [(forged, "node id does not match the public key")]
    assert B not in view.candidates  # not even dialled on its say-so


def test_a_peer_whose_own_record_is_unsigned_does_not_join(view: PeerView) -> None:
    unsigned = replace(ann("a"), public_key=b"", signature=b"")
    change = view.merge_direct(A, (unsigned,), now=1.0)
    assert change.joined == [] and A not in view.peers and A not in view.last_seen
    assert change.refused == [(unsigned, "public key of 0 bytes, not 32")]


def test_records_that_change_nothing_are_not_checked_again(
    view: PeerView, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gossip repeats every record every round: only news costs a check (even a cached one)."""
    view.merge_direct(A, (ann("a"), ann("b")), now=1.0)
    view.merge_direct(B, (ann("b"),), now=1.0)
    checked: list[PeerAnnouncement] = []
    check = view.verifier.refusal
    monkeypatch.setattr(view.verifier, "refusal", lambda a: checked.append(a) or check(a))
    for now in range(2, 20):
        view.merge_direct(A, (ann("a"), ann("b")), now=float(now))
        view.merge_direct(B, (ann("b"), ann("a")), now=float(now))
    assert checked == []
    view.merge_direct(A, (ann("a"), ann("b", version=1)), now=30.0)
    assert checked == [ann("b", version=1)]


# -- the dead set ------------------------------------------------------------------------------------------


def test_bury_removes_the_peer(view: PeerView) -> None:
    b = ann("b", 3)
    view.merge_direct(B, (b,), now=1.0)
    assert view.bury(B, 3, now=5.0) == b
    assert B not in view.peers and B not in view.last_seen
    assert view.dead[B].incarnation == 3
    assert view.dead[B].expires_at == 5.0 + TTL


def test_bury_unknown_node_records_death_and_drops_candidate(view: PeerView) -> None:
    view.merge_direct(A, (ann("a"), ann("b")), now=1.0)
    assert B in view.candidates
    assert view.bury(B, 1, now=2.0) is None
    assert B in view.dead and B not in view.candidates


def test_bury_keeps_the_highest_incarnation(view: PeerView) -> None:
    view.bury(B, 4, now=1.0)
    view.bury(B, 2, now=2.0)
    assert view.dead[B].incarnation == 4
    assert view.dead[B].expires_at == 2.0 + TTL
    view.merge_direct(C, (ann("c", 7),), now=3.0)
    view.bury(C, 7, now=3.0)
    assert view.dead[C].incarnation == 7


@pytest.mark.parametrize("stale_inc", [0, 1, 2])
def test_stale_hearsay_after_bury_neither_resurrects_nor_makes_candidate(
    view: PeerView, stale_inc: int
) -> None:
    view.merge_direct(B, (ann("b", 2),), now=1.0)
    view.bury(B, 2, now=2.0)
    for now in (3.0, 2.0 + TTL - 0.001):
        change = view.merge_direct(A, (ann("a"), ann("b", stale_inc, 99)), now=now)
        assert B not in view.peers
        assert B not in view.candidates
        assert change.new_candidates == [] and change.updated == []
        assert all(p.node_id != B for p in change.joined)
    assert view.is_buried(ann("b", stale_inc), now=3.0)


def test_after_dead_ttl_expires_hearsay_makes_a_candidate_again(view: PeerView) -> None:
    view.merge_direct(B, (ann("b", 2),), now=0.0)
    view.bury(B, 2, now=0.0)
    view.expire(TTL - 1)
    assert B in view.dead
    view.expire(TTL)
    assert B not in view.dead
    change = view.merge_direct(A, (ann("a"), ann("b", 2)), now=TTL)
    assert change.new_candidates == [B]
    assert B not in view.peers


def test_dead_entry_stops_burying_at_its_expiry_even_before_expire(view: PeerView) -> None:
    view.bury(B, 2, now=0.0)
    assert view.is_buried(ann("b", 2), now=TTL - 0.5)
    assert not view.is_buried(ann("b", 2), now=TTL)


def test_newer_incarnation_in_hearsay_about_buried_node_is_a_candidate(view: PeerView) -> None:
    view.merge_direct(B, (ann("b", 2),), now=1.0)
    view.bury(B, 2, now=2.0)
    change = view.merge_direct(A, (ann("a"), ann("b", 3)), now=3.0)
    assert change.new_candidates == [B]
    assert B not in view.peers


def test_direct_merge_from_buried_node_readmits_it(view: PeerView) -> None:
    view.merge_direct(B, (ann("b", 2),), now=1.0)
    view.bury(B, 2, now=2.0)
    back = ann("b", 2, 1)
    change = view.merge_direct(B, (back,), now=3.0)
    assert change.joined == [back]
    assert view.peers[B] == back
    assert B not in view.dead
    assert view.last_seen[B] == 3.0


def test_bury_with_older_incarnation_than_known_peer_is_ignored(view: PeerView) -> None:
    b = ann("b", 5)
    view.merge_direct(B, (b,), now=1.0)
    assert view.bury(B, 4, now=2.0) is None
    assert view.peers[B] == b
    assert B not in view.dead
    assert view.last_seen[B] == 1.0


# -- candidates ----------------------------------------------------------------------------------------------


def test_seeds(view: PeerView) -> None:
    view.add_seed("s", ("s:1",))
    assert view.candidates["s"].seed is True
    view.add_seed(OWN, ("me:1",))
    assert OWN not in view.candidates
    view.merge_direct(A, (ann("a"),), now=1.0)
    view.add_seed(A, ("a:1",))
    assert A not in view.candidates


def test_candidate_backoff_grows_and_non_seeds_are_dropped_after_five_failures(view: PeerView) -> None:
    view.merge_direct(A, (ann("a"), ann("b")), now=0.0)
    view.add_seed("s", ("s:1",))
    delays_b: list[float] = []
    delays_s: list[float] = []
    now = 100.0
    for i in range(1, 8):
        kept_b = view.candidate_failed(B, now, base_backoff_s=1.0, max_backoff_s=10.0)
        kept_s = view.candidate_failed("s", now, base_backoff_s=1.0, max_backoff_s=10.0)
        assert kept_s is True
        delays_s.append(view.candidates["s"].next_try - now)
        if i < 5:
            assert kept_b is True
            delays_b.append(view.candidates[B].next_try - now)
        else:
            assert kept_b is False
            assert B not in view.candidates
    assert delays_b == [1.0, 2.0, 4.0, 8.0]
    assert delays_s == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert view.candidates["s"].failures == 7


def test_candidate_failed_on_unknown_is_false(view: PeerView) -> None:
    assert view.candidate_failed("nobody", 1.0, 1.0, 10.0) is False


def test_due_candidates_respects_next_try(view: PeerView) -> None:
    view.add_seed("s", ("s:1",))
    view.merge_direct(A, (ann("a"), ann("b", addrs=("b:1",))), now=0.0)
    assert sorted(view.due_candidates(0.0)) == [(B, ("b:1",)), ("s", ("s:1",))]
    view.candidate_attempted("s", now=10.0, base_backoff_s=5.0)
    assert view.due_candidates(10.0) == [(B, ("b:1",))]
    assert view.due_candidates(14.9) == [(B, ("b:1",))]
    assert sorted(view.due_candidates(15.0)) == [(B, ("b:1",)), ("s", ("s:1",))]
    view.candidate_failed(B, now=20.0, base_backoff_s=2.0, max_backoff_s=60.0)
    assert view.due_candidates(21.0) == [("s", ("s:1",))]
    assert sorted(view.due_candidates(22.0)) == [(B, ("b:1",)), ("s", ("s:1",))]
    view.candidate_attempted("nobody", now=1.0, base_backoff_s=1.0)  # no-op, no error


# -- invariants under random operation sequences -------------------------------------------------------------

NODES = st.sampled_from([A, B, C, OWN])


def maybe_forged(record: PeerAnnouncement, forged: bool) -> PeerAnnouncement:
    """``record``, or a relayer's copy of it pushed far ahead without its node's signature."""
    return replace(record, version=record.version + 100, serving=("fake",)) if forged else record


ANNS = st.builds(
    maybe_forged,
    st.builds(
        ann,
        st.sampled_from(["a", "b", "c", "own"]),
        incarnation=st.integers(0, 3),
        version=st.integers(0, 3),
        role=st.sampled_from(["active", "active", "client", "standby"]),
    ),
    st.sampled_from([False, True]),
)
OPS = st.one_of(
    st.tuples(st.just("direct"), st.sampled_from([A, B, C]), st.lists(ANNS, max_size=4)),
    st.tuples(st.just("bury"), NODES, st.integers(0, 3)),
    st.tuples(st.just("seed"), NODES, st.just(0)),
    st.tuples(st.just("fail"), NODES, st.just(0)),
    st.tuples(st.just("expire"), NODES, st.just(0)),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.tuples(OPS, st.floats(0, 20)), max_size=25))
def test_invariants_hold_for_any_sequence(ops: list[tuple[tuple[str, str, object], float]]) -> None:
    view = PeerView(OWN, dead_ttl_s=TTL)
    now = 0.0
    for (kind, node, arg), step in ops:
        now += step
        if kind == "direct":
            anns = tuple(arg)  # type: ignore[call-overload]
            before = dict(view.peers)
            change = view.merge_direct(node, anns, now)
            # Only the peer we talked to can join; hearsay never makes a peer.
            assert all(p.node_id == node for p in change.joined)
            for p in change.updated:
                assert p.node_id in before and p.newer_than(before[p.node_id])
        elif kind == "bury":
            view.bury(node, arg, now)  # type: ignore[arg-type]
        elif kind == "seed":
            view.add_seed(node, (f"{node}:1",))
        elif kind == "fail":
            view.candidate_failed(node, now, 1.0, 8.0)
        else:
            view.expire(now)
        assert OWN not in view.peers and OWN not in view.candidates
        assert set(view.last_seen) == set(view.peers)
        assert not set(view.peers) & set(view.dead)
        assert all(p.role == "active" for p in view.peers.values())
        assert all(node_id == p.node_id for node_id, p in view.peers.items())
        assert all(refusal(p) is None for p in view.peers.values()), "only records their nodes signed"


def test_a_node_that_left_is_not_brought_back_by_its_own_answer_while_it_drains(view: PeerView) -> None:
    view.merge_direct(B, (ann("b", 2),), now=1.0)
    view.bury(B, 2, now=2.0, left=True)
    assert view.due_graves(now=2.0 + TTL / 2, interval_s=0.0) == []  # not dialled again
    change = view.merge_direct(B, (ann("b", 2, 5), ann("c")), now=3.0)  # it still answers an exchange
    assert B not in view.peers and change.joined == []
    assert C in view.candidates  # what it says of others still counts
    view.bury(B, 2, now=4.0)  # a death notice of the same life keeps it "left"
    assert view.dead[B].left
    change = view.merge_direct(B, (ann("b", 3),), now=5.0)  # restarted: a new incarnation comes back
    assert B in view.peers and [a.node_id for a in change.joined] == [B]


def test_a_buried_node_that_did_not_leave_is_dialled_and_met_again(view: PeerView) -> None:
    view.merge_direct(B, (ann("b", 2),), now=1.0)
    view.bury(B, 2, now=2.0)  # declared dead, perhaps by mistake
    assert [n for n, _ in view.due_graves(now=3.0, interval_s=0.5)] == [B]
    view.merge_direct(B, (ann("b", 2),), now=3.5)
    assert B in view.peers
