"""Mesh core benchmark (prints figures, asserts nothing).

1. Gossip convergence time and gossip bytes per node per minute for 5, 10 and 20 active nodes in one
   process on loopback QUIC.
2. Time from ``kill -9`` of a node process to ``peer.died`` on every survivor, over 10 kills in a
   5-process mesh (median and max).
3. Time from a leave to ``peer.left`` on the other node: ``Node.stop(leave=True)`` in one process,
   and SIGTERM to a node process (and whether any leave was taken for a death).
4. Serving failover (needs the llama.cpp binaries; the tiny random model): two node processes
   host it, a third fronts; after ``kill -9`` of a host, how long the front's requests take until
   one is answered, how many fail, and when the front logs ``peer.died`` and drops the host.

The tests check that these things happen; how soon is measured here.

Run: .venv/bin/python -m tests.bench.bench_mesh [--window 20] [--kills 10] [--leaves 5] [--failovers 3]
     [--only gossip kill leave failover]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from meshllm.serving.llama import LlamaNotFound, find_binaries
from meshllm.wire.messages import GetTransportStats, TransportStats
from tests.support import NodeFactory, NodeProcess, ProcessFactory, exit_cleanly_on_sigterm, wait_until
from tests.test_mesh_processes import _epoch, _peer_ids, _status


def gossip_figures(sizes: list[int], window_s: float) -> None:
    print("== gossip: convergence and bytes (in-process, loopback QUIC) ==")
    print(
        f"{'nodes':>5} {'converge_s':>10} {'gossip_B/node/min':>18} {'frames/node/min':>16} {'probes/node/min':>16}"
    )
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            factory = NodeFactory(Path(tmp))
            try:
                boot = factory.start("n0")
                t0 = time.monotonic()
                nodes = [boot] + [factory.start(f"n{i}", join=(boot.invite_token,)) for i in range(1, n)]
                ids = {x.node_id for x in nodes}
                wait_until(
                    lambda nodes=nodes, ids=ids: all(x.peer_ids() == ids - {x.node_id} for x in nodes),
                    timeout=120,
                    interval=0.02,
                    what=f"{n} nodes to converge",
                )
                converge = time.monotonic() - t0

                def stats(nodes=nodes) -> list[TransportStats]:
                    out = []
                    for x in nodes:
                        out.append(x.directory.ask("transport", GetTransportStats(), TransportStats))
                    return out

                before = stats()
                threading_wait(window_s)
                after = stats()
                per_min = 60.0 / window_s
                gossip_bytes = [
                    a.bytes_sent.get("GOSSIP", 0) - b.bytes_sent.get("GOSSIP", 0)
                    for a, b in zip(after, before, strict=True)
                ]
                frames = [
                    a.frames_sent.get("GOSSIP", 0) - b.frames_sent.get("GOSSIP", 0)
                    for a, b in zip(after, before, strict=True)
                ]
                probes = [a.probes_sent - b.probes_sent for a, b in zip(after, before, strict=True)]
                print(
                    f"{n:>5} {converge:>10.2f} {statistics.mean(gossip_bytes) * per_min:>18.0f} "
                    f"{statistics.mean(frames) * per_min:>16.0f} {statistics.mean(probes) * per_min:>16.0f}"
                )
            finally:
                factory.close()


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


def kill_figures(kills: int, size: int = 5) -> None:
    print(f"== kill -9 -> peer.died on every survivor ({size} node processes, {kills} kills) ==")
    with tempfile.TemporaryDirectory() as tmp:
        factory = ProcessFactory(Path(tmp))
        try:
            boot = factory.start("p0")
            members = {0: boot}
            for i in range(1, size):
                members[i] = factory.start(f"p{i}", join=(boot.token,))
            delays: list[float] = []
            worst_per_kill: list[float] = []
            for k in range(kills):
                ids = {p.node_id for p in members.values()}
                wait_until(
                    lambda ids=ids: all(_peer_ids(p) == ids - {p.node_id} for p in members.values()),
                    timeout=60,
                    what="convergence",
                )
                victim_index = 1 + k % (size - 1)
                victim = members[victim_index]
                victim_id = victim.node_id
                survivors = [p for i, p in members.items() if i != victim_index]
                marks = {id(p): len(p.records()) for p in survivors}
                killed_at = time.time()
                victim.kill9()
                this_kill = []
                for p in survivors:
                    rec = p.wait_event("peer.died", timeout=30, since=marks[id(p)], peer=victim_id)
                    this_kill.append(_epoch(rec) - killed_at)
                delays.extend(this_kill)
                worst_per_kill.append(max(this_kill))
                print(
                    f"  kill {k + 1}: survivors saw peer.died after "
                    + ", ".join(f"{d:.2f}s" for d in this_kill)
                )
                members[victim_index] = factory.start(f"p{victim_index}")
            print(
                f"peer.died delay over {len(delays)} observations: median {statistics.median(delays):.2f}s, "
                f"max {max(delays):.2f}s (worst survivor per kill: median {statistics.median(worst_per_kill):.2f}s)"
            )
        finally:
            factory.close()


def summary(delays: list[float]) -> str:
    return (
        f"median {statistics.median(delays) * 1e3:.0f} ms, max {max(delays) * 1e3:.0f} ms over {len(delays)}"
    )


def leave_figures(leaves: int) -> None:
    print(f"== leave -> peer.left on the other node ({leaves} leaves each) ==")
    with tempfile.TemporaryDirectory() as tmp:
        factory = NodeFactory(Path(tmp))
        try:
            a = factory.start("a")
            delays: list[float] = []
            for i in range(leaves):
                b = factory.start(f"b{i}", join=(a.invite_token,))
                wait_until(lambda b=b: b.node_id in a.peer_ids(), timeout=30, what="b to join")
                started = time.monotonic()
                b.stop(leave=True)
                record = factory.logs["a"].wait_for("peer.left", timeout=30, peer=b.node_id)
                delays.append(record["_t"] - started)
            died = len(factory.logs["a"].find("peer.died"))
            print(f"  in-process, Node.stop(leave=True): {summary(delays)}; leaves taken for deaths: {died}")
        finally:
            factory.close()
    with tempfile.TemporaryDirectory() as tmp:
        procs = ProcessFactory(Path(tmp))
        try:
            a_proc = procs.start("a")
            delays = []
            exits = []
            for i in range(leaves):
                b_proc = procs.start(f"b{i}", join=(a_proc.token,))
                b_id = b_proc.node_id
                wait_until(lambda b_id=b_id: b_id in _peer_ids(a_proc), timeout=30, what="b to join")
                mark = len(a_proc.records())
                sent = time.time()
                b_proc.signal(signal.SIGTERM)
                record = a_proc.wait_event("peer.left", timeout=30, since=mark, peer=b_id)
                delays.append(_epoch(record) - sent)
                assert b_proc.proc is not None
                exits.append(b_proc.proc.wait(30))
            died = len(a_proc.events("peer.died"))
            print(
                f"  node processes, SIGTERM: {summary(delays)}; exit codes {sorted(set(exits))}; "
                f"leaves taken for deaths: {died}"
            )
        finally:
            procs.close()


def _complete(proc: NodeProcess, model: str) -> str:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(
        str(proc.started["api"]) + "/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return str(json.loads(resp.read())["choices"][0]["text"])


def failover_figures(rounds: int) -> None:
    print(
        f"== serving failover: kill -9 of one of two hosts, requests through a third node ({rounds} kills) =="
    )
    try:
        find_binaries(None)
    except LlamaNotFound as exc:
        print(f"  skipped: {exc}")
        return
    from tests.tinymodel import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        folder.mkdir()
        model = tiny_model(folder).rename(folder / "tiny.gguf")
        serve = f'[models]\nserve = ["{model}"]\n'
        procs = ProcessFactory(Path(tmp))
        try:
            # The front is the bootstrap: a restarted host (a new port) joins through it again.
            front = procs.start("front")
            hosts = {name: procs.start(name, join=(front.token,), extra=serve) for name in ("a", "b")}

            def hosts_seen() -> set[str]:
                return {h for m in _status(front)["models"] if m["name"] == "tiny" for h in m["hosts"]}

            answered: list[float] = []
            died: list[float] = []
            dropped: list[float] = []
            failed: list[int] = []
            for k in range(rounds):
                ids = {p.node_id for p in hosts.values()}
                wait_until(lambda ids=ids: hosts_seen() == ids, timeout=120, what="front to see both hosts")
                expected = _complete(front, "tiny")
                victim_name = "ab"[k % 2]
                victim = hosts[victim_name]
                victim_id = victim.node_id
                mark = len(front.records())
                killed_at = time.time()
                victim.kill9()
                first_answer, failures = None, 0
                while first_answer is None or victim_id in hosts_seen():
                    if time.time() - killed_at > 120:
                        raise TimeoutError("no answer, or the front still lists the dead host, after 120 s")
                    try:
                        text = _complete(front, "tiny")
                    except OSError:
                        failures += 1
                        continue
                    if first_answer is None:
                        first_answer = time.time() - killed_at
                        if text != expected:
                            print(f"  WARNING: the survivor answered {text!r}, not {expected!r}")
                dropped.append(time.time() - killed_at)
                record = front.wait_event("peer.died", timeout=60, since=mark, peer=victim_id)
                died.append(_epoch(record) - killed_at)
                answered.append(first_answer)
                failed.append(failures)
                print(
                    f"  kill {k + 1}: first answer after {first_answer:.2f} s, failed requests {failures}, "
                    f"front peer.died after {died[-1]:.2f} s, dead host dropped after {dropped[-1]:.2f} s"
                )
                hosts[victim_name] = procs.start(victim_name)  # same config: same id, serves again
                hosts[victim_name].wait_event("llama.ready", timeout=120)
            print(
                f"  first answer after the kill: {summary(answered)}; failed requests: {sum(failed)}; "
                f"front peer.died: {summary(died)}; dead host dropped: {summary(dropped)}"
            )
        finally:
            procs.close()


SECTIONS = ("gossip", "kill", "leave", "failover")


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds to count gossip traffic")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--leaves", type=int, default=5)
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run (default: all)"
    )
    args = parser.parse_args()
    if "gossip" in args.only:
        gossip_figures(args.sizes, args.window)
    if "kill" in args.only:
        kill_figures(args.kills)
    if "leave" in args.only:
        leave_figures(args.leaves)
    if "failover" in args.only:
        failover_figures(args.failovers)


if __name__ == "__main__":
    main()
