"""A benchmark stopped with ``kill PID`` stops its nodes: SIGTERM runs its ``finally`` blocks."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.support import REPO

SCRIPT = """
import threading
from tests.support import exit_cleanly_on_sigterm
exit_cleanly_on_sigterm()
try:
    print("ready", flush=True)
    threading.Event().wait()
finally:
    print("nodes stopped", flush=True)
"""


def test_sigterm_runs_a_benchmarks_finally_blocks() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.strip() == "nodes stopped"
    assert proc.returncode == 128 + signal.SIGTERM
