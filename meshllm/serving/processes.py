"""Process-level mechanics for llama.cpp children: spawn, health-check, stop, and read their logs.

The Supervisor actor decides *when* a child starts, restarts or stops; this module says *how*, with no
actor state: a child is spawned in its own session (process group = its pid) with its output appended
to a log file and a parent-death signal of SIGKILL (``setpriv --pdeathsig``), so a ``kill -9`` of the node leaves no orphan; its
health is ``GET /health`` for llama-server or a TCP connect for the RPC server, and only counts when
the child itself holds the listening socket; stopping is SIGTERM to each group, one shared bounded
wait, then SIGKILL. Only groups whose leader is still unreaped are signalled, so a recycled pid is
never hit.

The kernel sends the parent-death signal when the *thread* that forked the child exits, not the
process: callers must call :func:`spawn` from a thread that lives as long as the child should.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from meshllm.logfiles import open_log_for_append
from meshllm.serving.llama import LOOPBACK

__all__ = [
    "KIND_RPC",
    "KIND_SERVER",
    "LOG_TAIL_CHARS",
    "LOG_TAIL_LINES",
    "describe_exit",
    "log_name",
    "owns_listening_port",
    "probe",
    "read_log_tail",
    "signal_group",
    "spawn",
    "stop_groups",
    "wait_healthy",
]

KIND_SERVER = "llama-server"
KIND_RPC = "rpc-server"

LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 8000
SETPRIV = shutil.which("setpriv")  # util-linux: sets the parent-death signal, then execs the child


def _with_parent_death_signal(cmd: Sequence[str]) -> list[str]:
    """``cmd`` run through ``setpriv --pdeathsig SIGKILL`` where util-linux has it (Linux), so the
    child gets SIGKILL when the thread that forked it exits. Not a ``preexec_fn``: Python runs that
    between fork and exec, which is not safe in a process with threads, and a node has many."""
    if SETPRIV is None:  # no parent-death signal: the Supervisor's stop is all there is
        return list(cmd)
    return [SETPRIV, "--pdeathsig", "SIGKILL", "--", *cmd]


def spawn(
    cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``cmd`` in its own process group, dying with this thread, output appended to ``log_path``.

    A ``=== meshllm: starting ...`` line is written first. ``env`` is added to this process's environment.
    Returns the child and the log's size before that line (where this start's output begins).
    Raises ``OSError`` if the log cannot be opened or the command cannot be started.
    """
    with open_log_for_append(log_path) as out:
        log_offset = out.tell()
        out.write(f"=== meshllm: starting {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            _with_parent_death_signal(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, **env} if env else None,
        )
    return proc, log_offset


def describe_exit(returncode: int) -> str:
    """``"exited with code 1"`` or ``"killed by SIGKILL"``, from a ``Popen.returncode``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


def log_name(key: str) -> str:
    """A file name (without suffix) for a child's key: anything but ``[A-Za-z0-9._-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) or "_"


def read_log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset`` (capped, decoded leniently)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 64 * 1024))
            data = f.read()
    except OSError as exc:
        return f"(no log: {exc})"
    text = data.decode("utf-8", errors="replace")
    tail = "\n".join(text.splitlines()[-lines:])
    return tail[-LOG_TAIL_CHARS:]


def owns_listening_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds the listening socket (not some other program on the port)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def probe(kind: str, port: int, timeout: float = 1.0) -> bool:
    """One health check: llama-server answers ``/health`` with 200; the RPC server accepts a connection."""
    if kind == KIND_SERVER:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200  # 503 while the model loads
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_healthy(
    kind: str, port: int, proc: subprocess.Popen[bytes], deadline: float, stop: threading.Event
) -> bool | None:
    """Poll the child (with growing pauses) until it is healthy and owns ``port``.

    Returns True once healthy, False when ``time.monotonic()`` reaches ``deadline`` first, and None when
    the child exited or ``stop`` was set (whoever watches the child or set ``stop`` knows already).
    """
    interval = 0.05
    while not stop.is_set() and proc.returncode is None:
        if probe(kind, port) and owns_listening_port(proc.pid, port):
            return True
        if time.monotonic() >= deadline:
            return False
        stop.wait(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 1.5, 0.5)
    return None


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to ``proc``'s process group, unless its leader is already reaped."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


KILL_WAIT_S = 5.0


def stop_groups(
    procs: Sequence[subprocess.Popen[bytes]],
    timeout_s: float,
    on_kill: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> None:
    """SIGTERM each child's process group, wait (together) up to ``timeout_s``, then SIGKILL.

    ``on_kill`` is called for each child still running at the deadline, just before its SIGKILL.
    Every child is reaped on return, but for one that outlives its SIGKILL by KILL_WAIT_S (stuck in the
    kernel): its watcher thread reaps it later.
    """
    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(proc)
            signal_group(proc, signal.SIGKILL)
            try:  # a child stuck in the kernel (D state) cannot die at once; never wait on it forever
                proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass  # its watcher thread reaps it when it goes
