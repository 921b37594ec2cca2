"""Soak benchmark (prints a table, asserts nothing): the mesh of tests/soak.py under 8 streaming loops
while a random non-client node is killed (SIGKILL) or stopped (SIGTERM) and restarted every 60-90 s.

Run: .venv/bin/python -m tests.bench.bench_soak [--minutes 20] [--kill-every 60 90] [--seed N]
     [--model PATH] (default: the tiny random model of tests/tinymodel.py, written to a temp dir)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.soak import Soak
from tests.support import exit_cleanly_on_sigterm
from tests.tinymodel import tiny_model


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(60.0, 90.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshllm-soak-") as tmp:
        folder = Path(tmp)
        model = args.model or tiny_model(folder / "models").rename(folder / "models" / "tiny.gguf")
        soak = Soak(folder, model, tuple(args.kill_every), args.seed)
        try:
            report = soak.run(args.minutes * 60)
        finally:
            soak.close()
        print(report.table())


if __name__ == "__main__":
    main()
