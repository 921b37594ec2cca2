"""Supervisor actor: owns the llama.cpp child processes of this node and reconciles them to a plan.

It is told the whole desired state (:class:`DesiredProcesses`), never "start X": every key that is
desired and not running is started, every running key that is no longer desired (or whose spec
changed) is stopped. Telling it the same plan twice changes nothing.

Each start of a key is a *generation*. Two helper threads follow it - a watcher blocked in
``wait()`` and a health poller (``GET /health`` for llama-server, a TCP connect for the RPC server) -
and report back as messages to this actor, tagged with the generation, so that news about a child
that was already replaced or stopped is dropped. A child that exits or is not healthy in time is
restarted after an exponential backoff; after ``max_failures`` failures in a row without ever
becoming ready the supervisor gives up on that spec until a new plan changes it.

How a child is spawned, probed and killed lives in :mod:`meshllm.serving.processes`: its own session
(process group = its pid), output in ``log_dir/<key>.log``, ``PR_SET_PDEATHSIG = SIGKILL`` so that a
``kill -9`` of the node leaves no orphan. The kernel sends that signal when the *thread* that forked the
child exits, not the process: every spawn here runs on the actor's own thread (restarts go through a
message to the actor, never a timer thread), and that thread lives exactly as long as the actor, whose
``on_stop`` stops the children first anyway. Only process groups this actor created are ever signalled.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pykka

from actors.base import Directory, MsgpackActor, handles
from meshllm.logfiles import LOG_MAX_BYTES, copy_truncate
from meshllm.logsetup import Logger
from meshllm.serving.llama import LlamaBinaries, free_port, rpc_server_command, server_command
from meshllm.serving.processes import (
    KIND_RPC,
    KIND_SERVER,
    describe_exit,
    log_name,
    read_log_tail,
    spawn,
    stop_groups,
    wait_healthy,
)
from meshllm.wire.codec import Message, encode
from meshllm.wire.messages import (
    ChildExited,
    ChildHealthy,
    ChildUnhealthy,
    DesiredProcesses,
    LlamaFailed,
    LlamaReady,
    LlamaStopped,
    ProcessSpec,
    RestartChild,
    Tick,
)

LOG_CHECK_S = 60.0  # how often the children's log sizes are looked at


@dataclass
class _Child:
    """Everything the supervisor knows about one desired key (running, backing off, or given up)."""

    spec: ProcessSpec
    log_path: Path
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    started_at: float = 0.0
    log_offset: int = 0
    ready: bool = False
    failures: int = 0
    gave_up: bool = False
    health_stop: threading.Event = field(default_factory=threading.Event)
    retry_timer: threading.Timer | None = None


class Supervisor(MsgpackActor):
    """Starts, health-checks, restarts and stops this node's llama.cpp children."""

    name = "supervisor"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        binaries: LlamaBinaries,
        subscriber: str,
        log_dir: Path,
        health_timeout_s: float = 120.0,
        *,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        max_failures: int = 5,
        stop_timeout_s: float = 5.0,
        give_up_retry_s: float = 300.0,
        log_max_bytes: int = LOG_MAX_BYTES,
    ) -> None:
        super().__init__(directory, logger)
        self.binaries = binaries
        self.subscriber = subscriber
        self.log_dir = Path(log_dir)
        self.health_timeout_s = health_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_failures = max_failures
        self.stop_timeout_s = stop_timeout_s
        self.give_up_retry_s = give_up_retry_s
        self.log_max_bytes = log_max_bytes
        self.children: dict[str, _Child] = {}
        self._last_desired: tuple[ProcessSpec, ...] | None = None
        self._generations = 0

    def on_start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.every(LOG_CHECK_S, "logs")

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        """Children's logs are rotated in place (copy, then truncate) once they grow too big."""
        for child in self.children.values():
            try:
                rotated = copy_truncate(child.log_path, self.log_max_bytes)
            except OSError as exc:
                self.log.warning("llama.log_rotate_failed", key=child.spec.key, reason=str(exc))
                continue
            if rotated:
                child.log_offset = 0  # this start's output now begins at the top of the emptied file
                self.log.info("llama.log_rotated", key=child.spec.key, path=str(child.log_path))

    def on_stop(self) -> None:
        super().on_stop()
        self._stop_children(list(self.children), reason="supervisor stopping")

    def on_failure(self, exception_type: object, exception_value: object, traceback: object) -> None:
        super().on_failure(exception_type, exception_value, traceback)
        self._stop_children(list(self.children), reason="supervisor failed")

    # -- plan ---------------------------------------------------------------------------------------

    @handles(DesiredProcesses)
    def on_desired(self, msg: DesiredProcesses) -> None:
        desired: dict[str, ProcessSpec] = {}
        for spec in msg.specs:
            if spec.key in desired and desired[spec.key] != spec:
                self.log.warning("llama.duplicate_key", key=spec.key, detail="the last spec wins")
            desired[spec.key] = spec
        stale = [
            key for key, child in self.children.items() if key not in desired or child.spec != desired[key]
        ]
        if stale:
            self._stop_children(stale, reason="no longer desired")
        changed = self._last_desired is not None and msg.specs != self._last_desired
        self._last_desired = msg.specs
        for key, spec in desired.items():
            if key not in self.children:
                child = _Child(spec=spec, log_path=self.log_dir / f"{log_name(key)}.log")
                self.children[key] = child
                self._start(child)
            elif changed and self.children[key].gave_up:  # the plan changed: another round of tries
                self._retry_given_up(self.children[key], "the plan changed")

    # -- news from helper threads ---------------------------------------------------------------------

    def _current(self, key: str, generation: int) -> _Child | None:
        """The child a helper's news is about, or None if that start was replaced, stopped or failed."""
        child = self.children.get(key)
        if child is None or child.generation != generation or child.proc is None:
            return None
        return child

    @handles(ChildHealthy)
    def on_healthy(self, msg: ChildHealthy) -> None:
        child = self._current(msg.key, msg.generation)
        if child is None or child.ready or child.proc is None:
            return
        child.ready = True
        child.failures = 0
        self.log.info(
            "llama.ready",
            key=msg.key,
            kind=child.spec.kind,
            port=child.port,
            pid=child.proc.pid,
            seconds=round(msg.seconds, 3),
        )
        self.tell(self.subscriber, LlamaReady(msg.key, child.spec.kind, child.port, child.proc.pid))

    @handles(ChildUnhealthy)
    def on_unhealthy(self, msg: ChildUnhealthy) -> None:
        child = self._current(msg.key, msg.generation)
        if child is not None:
            self._failed(child, msg.reason)

    @handles(ChildExited)
    def on_exited(self, msg: ChildExited) -> None:
        child = self._current(msg.key, msg.generation)
        if child is not None:
            self._failed(child, describe_exit(msg.returncode))

    @handles(RestartChild)
    def on_restart(self, msg: RestartChild) -> None:
        child = self.children.get(msg.key)
        # Only the start that failed may be restarted, and only while its key is still desired.
        if child is None or child.generation != msg.generation or child.proc is not None:
            return
        child.retry_timer = None
        if child.gave_up:
            self._retry_given_up(child, f"{self.give_up_retry_s:g}s after giving up")
        else:
            self._start(child)

    def _retry_given_up(self, child: _Child, why: str) -> None:
        """A child that was given up gets a fresh round of ``max_failures`` tries: whatever made it
        fail (a full disk, a GPU held by another program) may be gone by now."""
        if child.retry_timer is not None:
            child.retry_timer.cancel()
            child.retry_timer = None
        child.gave_up = False
        child.failures = 0
        self.log.info("llama.retrying", key=child.spec.key, kind=child.spec.kind, reason=why)
        self._start(child)

    # -- starting -----------------------------------------------------------------------------------

    def _tell_self(self, msg: Message) -> None:
        """Tell this actor a message from any thread (a no-op once the actor is gone)."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.actor_ref.tell(encode(msg))

    def _command(self, spec: ProcessSpec, port: int) -> list[str]:
        if spec.kind == KIND_SERVER:
            return server_command(self.binaries, spec.model_path, port, spec.args)
        if spec.kind == KIND_RPC:
            return rpc_server_command(self.binaries, port, spec.args)
        raise ValueError(f"unknown process kind {spec.kind!r} (want {KIND_SERVER!r} or {KIND_RPC!r})")

    def _start(self, child: _Child) -> None:
        spec = child.spec
        self._generations += 1
        child.generation = self._generations
        child.ready = False
        child.health_stop = threading.Event()
        try:
            port = free_port()
            cmd = self._command(spec, port)
        except ValueError as exc:  # a spec no restart can fix
            self._failed(child, f"bad spec: {exc}", give_up=True)
            return
        except OSError as exc:
            self._failed(child, f"no free loopback port: {exc}")
            return
        child.port = port
        try:
            proc, child.log_offset = spawn(cmd, child.log_path, spec.env)
        except OSError as exc:
            self._failed(child, f"could not start: {exc}")
            return
        child.proc = proc
        child.started_at = time.monotonic()
        self.log.info(
            "llama.starting",
            key=spec.key,
            kind=spec.kind,
            port=port,
            pid=proc.pid,
            cmd=shlex.join(cmd),
            log_file=str(child.log_path),
            generation=child.generation,
        )
        key, generation = spec.key, child.generation
        threading.Thread(
            target=self._watch, args=(key, generation, proc), name=f"supervisor-wait-{key}", daemon=True
        ).start()
        threading.Thread(
            target=self._health,
            args=(key, generation, spec.kind, port, proc, child.started_at, child.health_stop),
            name=f"supervisor-health-{key}",
            daemon=True,
        ).start()

    def _watch(self, key: str, generation: int, proc: subprocess.Popen[bytes]) -> None:
        """Helper thread: wait for the child to exit (reaping it) and say so."""
        returncode = proc.wait()
        self._tell_self(ChildExited(key, generation, returncode))

    def _health(
        self,
        key: str,
        generation: int,
        kind: str,
        port: int,
        proc: subprocess.Popen[bytes],
        started_at: float,
        stop: threading.Event,
    ) -> None:
        """Helper thread: poll the child until it is healthy, exits, is stopped, or runs out of time."""
        healthy = wait_healthy(kind, port, proc, started_at + self.health_timeout_s, stop)
        if healthy:
            self._tell_self(ChildHealthy(key, generation, time.monotonic() - started_at))
        elif healthy is not None:
            reason = f"not healthy within {self.health_timeout_s:g}s"
            self._tell_self(ChildUnhealthy(key, generation, reason))
        # None: exited (the watcher reports it) or stopped (the actor already knows).

    # -- failing ------------------------------------------------------------------------------------

    def _failed(self, child: _Child, reason: str, give_up: bool = False) -> None:
        spec = child.spec
        pid = child.proc.pid if child.proc is not None else 0
        if child.proc is not None:
            self._terminate([child])  # a child that never became healthy may still be running
        child.proc = None
        child.ready = False
        child.failures += 1
        tail = read_log_tail(child.log_path, child.log_offset) if pid else ""
        if give_up or child.failures >= self.max_failures:
            child.gave_up = True
            retry_in_s = -1.0  # "failed" for the election; one more round comes after give_up_retry_s
            delay = self.give_up_retry_s
        else:
            retry_in_s = min(self.backoff_base_s * 2 ** (child.failures - 1), self.backoff_cap_s)
            delay = retry_in_s
        timer = threading.Timer(delay, self._tell_self, args=(RestartChild(spec.key, child.generation),))
        timer.daemon = True
        child.retry_timer = timer
        timer.start()
        self.log.warning(
            "llama.failed",
            key=spec.key,
            kind=spec.kind,
            reason=reason,
            port=child.port,
            pid=pid,
            failures=child.failures,
            retry_in_s=retry_in_s,
            log_tail=tail,
        )
        self.tell(self.subscriber, LlamaFailed(spec.key, spec.kind, reason, tail, retry_in_s))

    # -- stopping -----------------------------------------------------------------------------------

    def _stop_children(self, keys: list[str], reason: str) -> None:
        children = [self.children.pop(key) for key in keys if key in self.children]
        for child in children:
            if child.retry_timer is not None:
                child.retry_timer.cancel()
        pids = {child.spec.key: child.proc.pid for child in children if child.proc is not None}
        self._terminate(children)
        for child in children:
            returncode = child.proc.returncode if child.proc is not None else None
            child.proc = None
            self.log.info(
                "llama.stopped",
                key=child.spec.key,
                kind=child.spec.kind,
                pid=pids.get(child.spec.key, 0),
                returncode=returncode,
                reason=reason,
            )
            self.tell(self.subscriber, LlamaStopped(child.spec.key, child.spec.kind))

    def _terminate(self, children: list[_Child]) -> None:
        """SIGTERM each child's process group, wait (together) up to ``stop_timeout_s``, then SIGKILL.

        Only groups this supervisor created are signalled, and only while their leader is unreaped
        (``returncode is None``), so a recycled pid is never hit.
        """
        procs = []
        for child in children:
            child.health_stop.set()
            if child.proc is not None:
                procs.append(child.proc)

        def warn(proc: subprocess.Popen[bytes]) -> None:
            self.log.warning(
                "llama.kill", pid=proc.pid, detail=f"no exit {self.stop_timeout_s:g}s after SIGTERM"
            )

        stop_groups(procs, self.stop_timeout_s, on_kill=warn)
