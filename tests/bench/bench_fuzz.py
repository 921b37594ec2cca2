"""Fuzz every decoder of untrusted input at length (prints figures, asserts nothing).

The targets of tests/fuzz_targets.py (codec, route replies and tunnel headers, framing both ways, the
GGUF head, the config), ``--examples`` each (default 100,000): examples run, seconds, the slowest
example, peak Python memory (tracemalloc) and RSS growth, and the first failure if any (hypothesis
shrinks it). The suite runs the same targets with 300 examples (tests/test_fuzz.py).

Run: .venv/bin/python -m tests.bench.bench_fuzz [--examples 100000] [--only codec]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import psutil
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS, Target


def run(target: Target, examples: int) -> None:
    slowest = 0.0
    count = 0

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(target.inputs())
    def fuzz(data: bytes | str) -> None:
        nonlocal slowest, count
        t0 = time.perf_counter()
        target.run(data)  # type: ignore[arg-type]
        slowest = max(slowest, time.perf_counter() - t0)
        count += 1

    rss0 = psutil.Process().memory_info().rss
    tracemalloc.start()
    t0 = time.perf_counter()
    failure = ""
    try:
        fuzz()
    except Exception as exc:  # the shrunk failing example: what the suite would report
        failure = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = (psutil.Process().memory_info().rss - rss0) / 2**20
    print(
        f"{target.name:<50} {count:>8} ex {elapsed:>7.1f} s  slowest {slowest * 1e3:>7.1f} ms  "
        f"peak {peak / 2**20:>6.1f} MiB  RSS +{grown:>6.1f} MiB  {failure or 'ok'}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--only", default="", help="run only targets whose name contains this")
    args = parser.parse_args()
    for target in TARGETS:
        if args.only in target.name:
            run(target, args.examples)


if __name__ == "__main__":
    main()
