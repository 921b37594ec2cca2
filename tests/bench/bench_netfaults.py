"""Network faults and CPU saturation, at length (prints figures, asserts nothing).

Node processes in network namespaces (tests/netns.py; needs root and iptables):

1. Partition 2+2 (a, c host the tiny model; b, d tunnel), ``--partitions`` times: seconds from the cut
   to every cross pair's ``peer.died``, from the heal to one mesh again, and the peer state changes.
2. ``--loss-percent`` (default 10) inbound loss and ``--delay-ms`` (default 50) inbound delay on every
   node (so every link, both ways) for ``--loss-minutes`` (default 10) while a third node streams
   completions through a 2-node split: requests, failures, false deaths, tokens/s against the same
   run without loss or delay just before (the ratio). The kernel here has no netem: the delay is an
   NFQUEUE rule and a user-space delayer in each namespace (tests/netdelay.py); ``--delay-ms 0`` runs
   loss alone.
3. One busy loop per core plus two for ``--cpu-minutes`` (default 5) while streaming through the
   split: the same counts.

Run (as root): .venv/bin/python -m tests.bench.bench_netfaults [--partitions 3] [--loss-minutes 10]
               [--loss-percent 10] [--delay-ms 50] [--cpu-minutes 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.netns import NamespacedNodeProcess, NetLab, available
from tests.support import exit_cleanly_on_sigterm, wait_until
from tests.test_netfaults import BusyLoops, epoch, four_nodes, loss_run, one_mesh, split_mesh, state_changes
from tests.tinymodel import tiny_model


def deaths_since(nodes: list[NamespacedNodeProcess], marks: list[int]) -> int:
    return sum(
        1 for p, mark in zip(nodes, marks, strict=True) for r in p.records()[mark:] if r.get("event") == "peer.died"
    )


def partitions(tmp: Path, model: Path, rounds: int) -> None:
    lab = NetLab(tmp / "partition")
    try:
        a, b, c, d = nodes = four_nodes(lab, model)
        for r in range(rounds):
            before = {p.node_id: state_changes(p) for p in nodes}
            marks = {p.node_id: len(p.records()) for p in nodes}
            cut_at = time.time()
            lab.partition(("a", "b"), ("c", "d"))
            detect = [
                epoch(x.wait_event("peer.died", 15, since=marks[x.node_id], peer=y.node_id)) - cut_at
                for side, other in (((a, b), (c, d)), ((c, d), (a, b)))
                for x in side
                for y in other
            ]
            healed_at = time.time()
            lab.heal()
            wait_until(lambda: one_mesh(nodes), 30, what="one mesh again")
            heal_s = time.time() - healed_at
            changes = sum(sum((state_changes(p) - before[p.node_id]).values()) for p in nodes)
            print(
                f"partition {r + 1}: dead in {min(detect):.2f}-{max(detect):.2f} s, one mesh {heal_s:.2f} s "
                f"after the heal, {changes} peer state changes (8 deaths + 8 joins expected)",
                flush=True,
            )
    finally:
        lab.close()


def loss(tmp: Path, model: Path, minutes: float, percent: float, delay_ms: float) -> None:
    lab = NetLab(tmp / "loss")
    try:
        nodes = split_mesh(lab, model)
        clean = loss_run(lab, nodes, model.stem, 60.0)
        marks = [len(p.records()) for p in nodes]
        for host in ("a", "b", "c"):
            if percent:
                lab.loss(host, percent / 100)
            if delay_ms:
                lab.delay(host, delay_ms)
        lossy = loss_run(lab, nodes, model.stem, minutes * 60)
        lab.heal()
        fault = f"{percent:g} % loss and {delay_ms:g} ms delay on every node's inbound"
        print(f"no loss or delay, 60 s: {clean}")
        print(f"{fault}, {minutes:g} min: {lossy}, false deaths {deaths_since(nodes, marks)}")
        if delay_ms:
            print(f"delayers (packets, most held at once, kernel drops): {lab.delay_counts}")
        print(f"tokens/s with the faults / without: {lossy['tokens_per_s'] / clean['tokens_per_s']:.3f}", flush=True)
    finally:
        lab.close()


def cpu(tmp: Path, model: Path, minutes: float) -> None:
    lab = NetLab(tmp / "cpu")
    try:
        nodes = split_mesh(lab, model)
        marks = [len(p.records()) for p in nodes]
        busy = BusyLoops(extra=2)
        try:
            run = loss_run(lab, nodes, model.stem, minutes * 60)
        finally:
            busy.close()
        print(
            f"{len(busy.procs)} busy loops, {minutes:g} min: {run}, false deaths {deaths_since(nodes, marks)}",
            flush=True,
        )
    finally:
        lab.close()


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--loss-minutes", type=float, default=10.0)
    parser.add_argument("--loss-percent", type=float, default=10.0)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--cpu-minutes", type=float, default=5.0)
    args = parser.parse_args()
    if (why := available()) is not None:
        raise SystemExit(f"cannot run: {why}")
    with tempfile.TemporaryDirectory(prefix="bench-netfaults-") as tmp_name:
        tmp = Path(tmp_name)
        for sub in ("partition", "loss", "cpu", "models"):
            (tmp / sub).mkdir()
        tiny = tiny_model(tmp / "models", n_layer=2).rename(tmp / "models" / "tiny.gguf")
        tiny4 = tiny_model(tmp / "models", n_layer=4).rename(tmp / "models" / "tiny4.gguf")
        if args.partitions:
            partitions(tmp, tiny, args.partitions)
        if args.loss_minutes:
            loss(tmp, tiny4, args.loss_minutes, args.loss_percent, args.delay_ms)
        if args.cpu_minutes:
            cpu(tmp, tiny4, args.cpu_minutes)


if __name__ == "__main__":
    main()
