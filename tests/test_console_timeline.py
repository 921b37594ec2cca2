"""The console's pure parts, without a network: log records -> timeline entries, the ring buffer,
what counts as a status change for the event stream, and the API URLs the console shows and relays to."""

from __future__ import annotations

import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meshllm.console.feed import change_key
from meshllm.console.proxy import api_urls
from meshllm.console.timeline import TIMELINE_SIZE, Timeline, timeline_entry
from meshllm.logsetup import make_logger
from tests.support import LogCapture

A = "a" * 32
B = "b" * 32


def test_peer_events_name_the_peer() -> None:
    joined = timeline_entry({"event": "peer.joined", "peer": B, "peer_name": "b", "node": "a", "ts": "t1"})
    died = timeline_entry({"event": "peer.died", "peer": B, "peer_name": "b", "reason": "no probe answer"})
    left = timeline_entry({"event": "peer.left", "peer": B, "peer_name": "b"})
    assert joined == {"ts": "t1", "kind": "joined", "node_id": B, "name": "b", "model": "", "text": ""}
    assert died is not None and (died["kind"], died["name"], died["text"]) == ("died", "b", "no probe answer")
    assert left is not None and (left["kind"], left["node_id"]) == ("left", B)


def test_a_peer_that_joins_as_a_promoted_standby_is_a_promotion() -> None:
    entry = timeline_entry({"event": "peer.joined", "peer": B, "peer_name": "s", "promoted_for": ["tiny"]})
    assert entry is not None
    assert (entry["kind"], entry["model"], entry["name"]) == ("promoted", "tiny", "s")


def test_own_events_name_the_node_that_logged_them() -> None:
    base = {"node": "s", "node_id": A}
    promoting = timeline_entry({**base, "event": "standby.promoting", "model": "m", "reason": "death"})
    promoted = timeline_entry({**base, "event": "standby.promoted", "model": "m", "port": 1})
    demoted = timeline_entry({**base, "event": "standby.demoted", "model": "m", "reason": "host back"})
    assert promoting is not None and (promoting["kind"], promoting["name"], promoting["text"]) == (
        "promoting",
        "s",
        "death",
    )
    assert promoted is not None and (promoted["kind"], promoted["node_id"], promoted["model"]) == (
        "promoted",
        A,
        "m",
    )
    assert demoted is not None and demoted["kind"] == "demoted"


def test_plan_changes_say_the_mode_host_workers_and_fractions() -> None:
    split = timeline_entry(
        {
            "event": "election.plan",
            "node": "a",
            "node_id": A,
            "model": "big",
            "mode": "split",
            "host": A,
            "workers": [B],
            "fractions": [0.667, 0.333],
            "detail": "",
        }
    )
    waiting = timeline_entry(
        {"event": "election.plan", "model": "big", "mode": "waiting", "detail": "needs 3 GiB more"}
    )
    assert split is not None and split["kind"] == "plan" and split["model"] == "big"
    assert split["text"] == "split: host aaaaaaaa, workers bbbbbbbb (0.67 / 0.33)"
    assert waiting is not None and waiting["text"] == "waiting: needs 3 GiB more"


def test_other_events_are_not_on_the_timeline() -> None:
    for event in ("node.started", "peer.updated", "llama.ready", "routes.refreshed", ""):
        assert timeline_entry({"event": event, "peer": B}) is None
    assert timeline_entry({}) is None


@given(st.dictionaries(st.sampled_from(["event", "peer", "peer_name", "model", "mode", "workers",
                                        "fractions", "promoted_for", "reason", "ts", "node"]),
                       st.none() | st.integers() | st.text(max_size=5) | st.lists(st.text(max_size=3))))
def test_odd_records_never_raise(record: dict[str, Any]) -> None:
    entry = timeline_entry(record)
    assert entry is None or all(isinstance(v, str) for v in entry.values())


@given(st.lists(st.sampled_from(["peer.joined", "peer.died", "node.started", "election.plan"]), max_size=120))
def test_the_ring_keeps_the_newest_fifty_newest_first(events: list[str]) -> None:
    timeline = Timeline()
    for i, event in enumerate(events):
        timeline.observe({"event": event, "peer": str(i), "node_id": str(i)})
    kept = [str(i) for i, e in enumerate(events) if e != "node.started"]
    entries = timeline.entries()
    assert [e["node_id"] for e in entries] == list(reversed(kept))[:TIMELINE_SIZE]
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)


def test_the_timeline_taps_the_log_and_tells_its_listener() -> None:
    timeline = Timeline()
    told = threading.Event()
    timeline.on_change = told.set
    log = make_logger("a", stream=LogCapture(), tap=timeline.observe).bind(node_id=A)
    log.info("node.started")
    assert not told.is_set() and timeline.entries() == []
    log.info("peer.joined", peer=B, peer_name="b", addrs=[], promoted_for=[])
    assert told.is_set()
    [entry] = timeline.entries()
    assert (entry["kind"], entry["name"]) == ("joined", "b") and entry["ts"].endswith("Z")


def test_a_failing_listener_does_not_break_logging() -> None:
    timeline = Timeline()

    def broken() -> None:
        raise RuntimeError("boom")

    timeline.on_change = broken
    capture = LogCapture()
    make_logger("a", stream=capture, tap=timeline.observe).info("peer.left", peer=B, peer_name="b")
    assert capture.find("peer.left") and len(timeline.entries()) == 1


def _status(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "node_id": A,
        "peers": [{"node_id": B, "vram_bytes": 1, "last_seen_s": 0.1}],
        "models": [],
        "rpc_bytes": {"to_workers": 0},
        "gpus": [{"index": 0, "total_bytes": 8 << 30, "free_bytes": 6 << 30}],
        "timeline": [],
    }
    body.update(over)
    return body


@given(
    st.floats(0, 100, allow_nan=False),
    st.integers(0, 1 << 40),
    st.integers(0, (1 << 26) - 1),
)
def test_volatile_counters_are_not_a_change(last_seen: float, rpc: int, jitter: int) -> None:
    moved = _status(
        peers=[{"node_id": B, "vram_bytes": 1, "last_seen_s": last_seen}],
        rpc_bytes={"to_workers": rpc},
        gpus=[{"index": 0, "total_bytes": 8 << 30, "free_bytes": (6 << 30) + jitter}],
    )
    assert change_key(moved) == change_key(_status())


def test_topology_plans_timeline_and_memory_are_changes() -> None:
    same = change_key(_status())
    assert change_key(_status(peers=[])) != same
    assert change_key(_status(models=[{"name": "m", "state": "solo"}])) != same
    assert change_key(_status(timeline=[{"seq": 1, "kind": "joined"}])) != same
    assert change_key(_status(gpus=[{"index": 0, "total_bytes": 8 << 30, "free_bytes": 2 << 30}])) != same
    assert change_key(_status(passive_connections=3)) != same


def test_odd_statuses_have_a_key() -> None:
    for body in ({}, {"peers": None, "gpus": "x"}, {"peers": [None, 1], "gpus": [None, {"free_bytes": "?"}]}):
        assert isinstance(change_key(body), str)


def test_api_urls_show_the_bound_address_and_reach_a_wildcard_on_loopback() -> None:
    assert api_urls(None) == ("", "")
    assert api_urls(("127.0.0.1", 0)) == ("", "")
    assert api_urls(("127.0.0.1", 9337)) == ("http://127.0.0.1:9337/v1", "http://127.0.0.1:9337/v1")
    assert api_urls(("0.0.0.0", 9337)) == ("http://0.0.0.0:9337/v1", "http://127.0.0.1:9337/v1")
    assert api_urls(("::1", 9)) == ("http://[::1]:9/v1", "http://[::1]:9/v1")
