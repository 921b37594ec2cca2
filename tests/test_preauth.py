"""The pure rules before admission (meshllm/net/preauth.py): per-source and total caps on
unauthenticated connections, the bounded queue beyond them and who leaves it first, queue expiry,
what counts as one source, and the log throttle."""

from __future__ import annotations

import pytest

from meshllm.net import preauth
from meshllm.net.preauth import Limits, LogThrottle, PreAuthLimiter, Verdict, source_key

SMALL = Limits(per_source=2, total=3, queue_per_source=2, queue_total=3, queue_wait_s=5.0)


def test_the_defaults_are_what_the_issue_asks_for() -> None:
    assert 8 <= preauth.PER_SOURCE <= 16 and 128 <= preauth.TOTAL <= 256
    assert 2.0 <= preauth.AUTH_DEADLINE_S <= 3.0
    assert preauth.MAX_HELLO_BYTES < preauth.MAX_PREAUTH_BYTES < 1 << 20
    assert Limits() == Limits(
        preauth.PER_SOURCE, preauth.TOTAL, preauth.QUEUE_PER_SOURCE, preauth.QUEUE_TOTAL
    )


def test_per_source_cap_then_queue_then_refusal() -> None:
    lim: PreAuthLimiter[str] = PreAuthLimiter(SMALL)
    verdicts = [lim.arrive("a", f"t{i}", 0.0) for i in range(5)]
    assert verdicts == [Verdict.ADMIT, Verdict.ADMIT, Verdict.QUEUE, Verdict.QUEUE, Verdict.REFUSE]
    assert lim.held_by("a") == 2 and lim.queued == 2
    assert lim.counts["refused_source_queue_full"] == 1
    # Another source is not held back by a's queue.
    assert lim.arrive("b", "b0", 0.0) is Verdict.ADMIT


def test_total_cap_and_total_queue() -> None:
    lim: PreAuthLimiter[str] = PreAuthLimiter(SMALL)
    assert [lim.arrive(s, s, 0.0) for s in ("a", "b", "c")] == [Verdict.ADMIT] * 3
    assert lim.held == 3
    assert [lim.arrive(s, s + "2", 0.0) for s in ("d", "e", "f")] == [Verdict.QUEUE] * 3
    assert lim.arrive("g", "g", 0.0) is Verdict.REFUSE
    assert lim.counts["refused_queue_full"] == 1


def test_a_release_admits_the_waiting_source_that_holds_the_fewest_slots() -> None:
    lim: PreAuthLimiter[str] = PreAuthLimiter(
        Limits(per_source=3, total=3, queue_per_source=5, queue_total=5)
    )
    for t in ("a1", "a2", "a3", "a4", "a5"):  # a floods: 3 held, 2 waiting
        lim.arrive("a", t, 0.0)
    assert lim.arrive("b", "b1", 1.0) is Verdict.QUEUE  # a newcomer, behind a's queue
    assert lim.release("a", 2.0) == ["b1"]  # b holds nothing: it goes first
    assert lim.release("a", 2.0) == ["a4"]  # then FIFO among equals
    assert lim.counts["admitted_from_queue"] == 2 and lim.held == 3


def test_a_source_at_its_cap_waits_even_when_the_total_has_room() -> None:
    lim: PreAuthLimiter[str] = PreAuthLimiter(SMALL)
    for t in ("a1", "a2", "a3"):
        lim.arrive("a", t, 0.0)
    lim.arrive("b", "b1", 0.0)
    assert lim.release("b", 0.0) == []  # total has room, but a still holds its 2
    assert lim.release("a", 0.0) == ["a3"]


def test_queued_connections_expire() -> None:
    expired: list[str] = []
    lim: PreAuthLimiter[str] = PreAuthLimiter(SMALL, on_expire=expired.append)
    lim.arrive("a", "a1", 0.0)
    lim.arrive("a", "a2", 0.0)
    lim.arrive("a", "old", 0.0)
    lim.arrive("a", "new", 4.0)
    assert lim.release("a", 6.0) == ["new"]  # "old" waited 6 s > 5 s: dropped, never admitted
    assert expired == ["old"] and lim.counts["expired_in_queue"] == 1 and lim.queued == 0


def test_withdraw_and_release_without_a_slot() -> None:
    lim: PreAuthLimiter[object] = PreAuthLimiter(SMALL)
    t1, t2, t3 = object(), object(), object()
    for t in (t1, t2, t3):
        lim.arrive("a", t, 0.0)
    assert lim.is_queued("a", t3) and lim.withdraw("a", t3) and not lim.withdraw("a", t3)
    assert lim.release("a", 0.0) == []
    lim.release("a", 0.0)
    with pytest.raises(ValueError, match="without a held slot"):
        lim.release("a", 0.0)


def test_a_burst_of_200_from_one_address_all_get_through_when_each_authenticates() -> None:
    """Legitimate clients authenticate within ms: with the default caps, 200 at once from one
    address are queued, not refused, and each release lets the next one in."""
    lim: PreAuthLimiter[int] = PreAuthLimiter()
    admitted = [i for i in range(200) if lim.arrive("127.0.0.1", i, 0.0) is Verdict.ADMIT]
    assert len(admitted) == preauth.PER_SOURCE and lim.queued == 200 - preauth.PER_SOURCE
    done = 0
    while admitted:
        admitted.pop(0)
        done += 1
        admitted += lim.release("127.0.0.1", 0.01 * done)
    assert done == 200 and lim.held == 0 and not lim.counts["refused_source_queue_full"]


def test_what_counts_as_one_source() -> None:
    assert source_key(("10.0.0.1", 5000)) == "10.0.0.1"
    assert source_key(("2001:db8::1", 5000, 0, 0)) == source_key(("2001:db8::ffff", 1)) == "2001:db8::/64"
    assert source_key(("2001:db8:0:1::1", 1)) != source_key(("2001:db8::1", 1))
    assert source_key(("::ffff:10.0.0.1", 1)) == "10.0.0.1"
    assert source_key(("fe80::1%eth0", 1)) == "fe80::/64"
    assert source_key(None) == "None" and source_key("weird") == "weird"


def test_the_log_throttle_lets_a_burst_through_then_counts() -> None:
    t = LogThrottle(burst=2, interval_s=10.0)
    assert [t.allow(0.0), t.allow(1.0), t.allow(2.0), t.allow(3.0)] == [0, 0, None, None]
    assert t.suppressed == 2
    assert t.allow(10.5) == 2  # a new window: logged, with how many were held back
    assert t.suppressed == 0
