"""Three nodes as separate `meshllm run` processes: join, converge, kill -9, restart, SIGTERM."""

from __future__ import annotations

import datetime
import signal
from typing import Any

from tests.support import NodeProcess, ProcessFactory, console_status, wait_until


def _status(proc: NodeProcess) -> dict[str, Any]:
    return console_status(proc.console_url)


def _peer_ids(proc: NodeProcess) -> set[str]:
    return {p["node_id"] for p in _status(proc)["peers"]}


def _epoch(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def test_three_processes_converge_detect_kill_and_rejoin(procs: ProcessFactory) -> None:
    a = procs.start("a")
    b = procs.start("b", join=(a.token,))
    c = procs.start("c", join=(a.token,))
    everyone = [a, b, c]
    ids = {p.node_id for p in everyone}
    wait_until(
        lambda: all(_peer_ids(p) == ids - {p.node_id} for p in everyone), timeout=20, what="three to converge"
    )

    b_id = b.node_id
    mark = {p: len(p.records()) for p in (a, c)}
    b.kill9()
    # The events, not their speed: tests/bench/bench_mesh.py measures kill -9 -> peer.died.
    for p in (a, c):
        p.wait_event("peer.died", timeout=20, since=mark[p], peer=b_id)
    wait_until(lambda: b_id not in _peer_ids(a) and b_id not in _peer_ids(c), timeout=10, what="b dropped")

    b2 = procs.start("b")  # same config, same data dir: same node id
    assert b2.node_id == b_id
    wait_until(lambda: all(_peer_ids(p) == ids - {p.node_id} for p in (a, b2, c)), timeout=20, what="b back")


def test_sigterm_sends_leaving_notice(procs: ProcessFactory) -> None:
    a = procs.start("a")
    b = procs.start("b", join=(a.token,))
    wait_until(lambda: _peer_ids(a) == {b.node_id}, timeout=20, what="b to join")
    mark = len(a.records())
    b.signal(signal.SIGTERM)
    # A leave, not a death; tests/bench/bench_mesh.py measures SIGTERM -> peer.left.
    a.wait_event("peer.left", timeout=10, since=mark, peer=b.node_id)
    assert b.proc is not None and b.proc.wait(10) == 0
    assert not a.events("peer.died", peer=b.node_id)
