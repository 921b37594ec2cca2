"""Mesh core benchmark (prints figures, asserts nothing).

1. Gossip convergence time and gossip bytes per node per minute for 5, 10 and 20 active nodes in one
   process on loopback QUIC.
2. Time from ``kill -9`` of a node process to ``peer.died`` on every survivor, over 10 kills in a
   5-process mesh (median and max).

Run: .venv/bin/python -m tests.bench.bench_mesh [--window 20] [--kills 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from meshllm.wire.messages import GetTransportStats, TransportStats
from tests.support import NodeFactory, ProcessFactory, wait_until
from tests.test_mesh_processes import _epoch, _peer_ids


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
                        s = x.directory.ask("transport", GetTransportStats())
                        assert isinstance(s, TransportStats)
                        out.append(s)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds to count gossip traffic")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    args = parser.parse_args()
    gossip_figures(args.sizes, args.window)
    kill_figures(args.kills)


if __name__ == "__main__":
    main()
