"""Split load with and without the worker's tensor cache (prints figures, asserts nothing).

A generated llama GGUF (tests/tinymodel.py, 8 layers whose three feed-forward tensors are 11 MiB
each, 264 MiB in all; SmolLM2's tensors are all under llama.cpp's 10 MiB cache threshold but one) is
split 1:1 over two node processes with equal VRAM, so the worker holds three layers and the output.
Rounds alternate between ``[llama] tensor_cache = false`` (every weight of the worker's share crosses
the RPC tunnel) and ``true`` (the worker fills its rpc-server's cache from its own copy of the GGUF
first, then the host sends a hash per tensor over 10 MiB). Each round starts both nodes afresh, with
empty data directories, so every "true" round pays for its fill.

Per round: the host's split llama-server, start to "model loaded" by llama.cpp's own log clock; the bytes the host sent to the
worker's rpc-server by then; the worker's cache fill (plan -> ``rpc.cache_filled``). Printed as
medians with the ratio warm/cold of the load, and what the cold bytes alone would take on a 1 Gbit/s
link (loopback carries them at memory speed, so the load difference here is the floor).

Run: .venv/bin/python -m tests.bench.bench_worker_cache [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.bench_gateway import other_benchmarks
from tests.support import ProcessFactory, console_status, exit_cleanly_on_sigterm, model_status, wait_until
from tests.test_mesh_processes import _epoch
from tests.tinymodel import tiny_model

MODEL = "wide8"
GBIT_BYTES_S = 125e6


def config(model: Path, tensor_cache: bool) -> str:
    return (
        f'[models]\nserve = ["{model}"]\nforce_split = true\n'
        f"[llama]\ntensor_cache = {'true' if tensor_cache else 'false'}\n"
    )


def llama_load_s(server_log: Path) -> float:
    """Seconds from the split llama-server's start to its "model loaded", by llama.cpp's own clock
    (each line starts with minutes.seconds.ms.us since start), in the last run the log holds."""
    text = server_log.read_text(errors="replace")
    last = text.rsplit("=== meshllm: starting", 1)[-1]
    for line in last.splitlines():
        if "model loaded" in line:
            minutes, seconds, ms, us = (int(x) for x in line.split()[0].split("."))
            return minutes * 60 + seconds + ms / 1e3 + us / 1e6
    raise RuntimeError(f"no 'model loaded' in the last run of {server_log}")


def one_round(procs: ProcessFactory, model: Path, tag: str, tensor_cache: bool) -> dict[str, float]:
    a = procs.start(f"{tag}a", extra=config(model, tensor_cache), node_extra="vram_gb = 2.0")
    b = procs.start(f"{tag}b", join=(a.token,), extra=config(model, tensor_cache), node_extra="vram_gb = 2.0")
    host, worker = (a, b) if a.node_id < b.node_id else (b, a)

    def split() -> dict[str, Any] | None:
        m = model_status(host.console_url, MODEL)
        return m if m.get("state") == "split" and m.get("workers") == [worker.node_id] else None

    wait_until(split, 180, what="the split")
    host_dir = procs.tmp / (f"{tag}a" if host is a else f"{tag}b")
    sent = int(console_status(worker.console_url)["rpc_bytes"]["served_in"])
    load = llama_load_s(host_dir / "llama-logs" / f"server_{MODEL}.log")
    out = {"load_s": load, "bytes": float(sent), "fill_s": 0.0}
    if tensor_cache:
        plan = next(e for e in worker.events("election.plan") if e.get("mode") == "worker")
        out["fill_s"] = _epoch(worker.events("rpc.cache_filled")[-1]) - _epoch(plan)
    for proc in (a, b):
        proc.stop()
    return out


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode, interleaved")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-worker-cache-") as tmp_name:
        tmp = Path(tmp_name)
        model = tiny_model(tmp / "models", n_layer=8, n_ff=45056).rename(tmp / "models" / f"{MODEL}.gguf")
        print(f"model {model.name}: {model.stat().st_size / 2**20:.0f} MiB, split 1:1 over two node processes")
        rows: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        (tmp / "nodes").mkdir()
        procs = ProcessFactory(tmp / "nodes")
        try:
            for r in range(args.rounds):
                if others := other_benchmarks():
                    print(f"WARNING: other runs on this machine: {others}", flush=True)
                for cached in (False, True):
                    row = one_round(procs, model, f"r{r}{'w' if cached else 'c'}", cached)
                    rows[cached].append(row)
                    print(
                        f"round {r + 1} {'warm' if cached else 'cold'}: load {row['load_s']:.2f} s, "
                        f"{row['bytes'] / 2**20:.1f} MiB to the worker, fill {row['fill_s']:.2f} s",
                        flush=True,
                    )
        finally:
            procs.close()

    def med(cached: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows[cached])

    cold_load, warm_load = med(False, "load_s"), med(True, "load_s")
    cold_bytes, warm_bytes = med(False, "bytes"), med(True, "bytes")
    print()
    print(f"{'worker cache':<14} {'load s':>8} {'MiB to worker':>14} {'fill s':>7}")
    print(f"{'cold (off)':<14} {cold_load:>8.2f} {cold_bytes / 2**20:>14.1f} {'-':>7}")
    print(f"{'warm (filled)':<14} {warm_load:>8.2f} {warm_bytes / 2**20:>14.1f} {med(True, 'fill_s'):>7.2f}")
    print(f"load warm/cold: {warm_load / cold_load:.3f}; bytes warm/cold: {warm_bytes / cold_bytes:.4f}")
    print(
        f"the cold bytes alone at 1 Gbit/s: {cold_bytes / GBIT_BYTES_S:.2f} s; "
        f"the warm ones: {warm_bytes / GBIT_BYTES_S:.3f} s"
    )


if __name__ == "__main__":
    main()
