"""A bounded soak of a whole mesh of node processes, shared by the CI test (tests/test_soak.py, 2 min)
and the benchmark (tests/bench/bench_soak.py, 20 min by default).

The mesh: three active nodes ``a``, ``b``, ``c`` (``a`` and ``b`` serve the model, ``c`` serves nothing),
a standby ``s`` that has the model on its disk, and two clients ``x``, ``y`` joined through all three
actives. Eight streaming loops (four per client) send ``/v1/completions`` with ``stream=True`` through
the clients' gateways, while a chaos loop, every ``kill_every`` seconds (drawn uniformly), picks a
non-client node at random, ends it with SIGKILL or SIGTERM sent to the node's own PID only (as a crash
or a service manager would: its llama.cpp children are not in the signal), waits until its peers
noticed, and starts it again from the same config (same data dir, same node id, same fixed port).

What is counted, and why:

- every request, split by how it ended: complete (``finish_reason`` seen), failed before its first
  byte (the gateway should have retried it on another host: goal 0), failed after it (its host died
  mid-stream: reported, expected with kills of hosts);
- orphans: every descendant a node process had (llama-server, rpc-server) sampled each second; one still
  alive ``ORPHAN_GRACE_S`` after its node process ended is an orphan (goal 0);
- RSS, threads and open file descriptors of each node process incarnation, when it became ready and at
  its end (flat: no leak under churn);
- peer state changes each node logged (``peer.joined`` / ``peer.died`` / ``peer.left``), and false
  deaths among them: a ``peer.died`` naming a node whose process was running at that moment.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import psutil

from tests.support import NodeProcess, console_status, wait_until, write_config

ORPHAN_GRACE_S = 10.0
STREAMS_PER_CLIENT = 4
ACTIVES = ("a", "b", "c")
HOSTS = ("a", "b")
CHAOS_TARGETS = ("a", "b", "c", "s")
PEER_EVENTS = ("peer.joined", "peer.died", "peer.left")


def free_port() -> int:
    """A port number free on both UDP (QUIC) and TCP (the fast path), so restarts keep their address."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


@dataclass
class Usage:
    """One process's resources at one moment."""

    rss_mb: float
    threads: int
    fds: int


def usage_of(pid: int) -> Usage | None:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return Usage(p.memory_info().rss / 2**20, p.num_threads(), p.num_fds())
    except psutil.Error:
        return None


@dataclass
class Incarnation:
    """One run of one node: its process, when it started and ended, its resources at both ends."""

    name: str
    proc: NodeProcess
    started_at: float
    ended_at: float | None = None
    how_ended: str = "running"
    ending: bool = False  # signalled: its resources are no longer sampled
    first: Usage | None = None
    last: Usage | None = None
    children: dict[int, psutil.Process] = field(default_factory=dict)  # psutil checks PID reuse


@dataclass
class Tally:
    """Requests by outcome (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: str, error: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if error:
                self.errors[f"{outcome}: {error[:120]}"] += 1


@dataclass
class SoakReport:
    """What a soak measured; :meth:`table` prints it."""

    seconds: float
    requests: Counter[str]
    errors: Counter[str]
    disruptions: list[tuple[float, str, str]]
    incarnations: list[Incarnation]
    orphans: list[str]
    peer_changes: dict[str, Counter[str]]
    false_deaths: list[str]
    converged: bool

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def table(self) -> str:
        r = self.requests
        lines = [
            f"soak: {self.seconds:.0f} s, {len(self.disruptions)} disruptions: "
            + ", ".join(f"{how} {name} @{t:.0f}s" for t, name, how in self.disruptions),
            "",
            "| requests | complete | failed before first byte | failed after it | orphans | false deaths |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {self.total} | {r['complete']} | {r['before_first_byte']} | {r['after_first_byte']} "
            f"| {len(self.orphans)} | {len(self.false_deaths)} |",
            "",
            "| node run | ended | RSS MB start→end | threads start→end | fds start→end |",
            "|---|---|---|---|---|",
        ]
        for inc in self.incarnations:
            a, b = inc.first, inc.last
            if a is None or b is None:
                lines.append(f"| {inc.name}@{inc.started_at:.0f}s | {inc.how_ended} | - | - | - |")
                continue
            lines.append(
                f"| {inc.name}@{inc.started_at:.0f}s | {inc.how_ended} | {a.rss_mb:.0f}→{b.rss_mb:.0f} "
                f"| {a.threads}→{b.threads} | {a.fds}→{b.fds} |"
            )
        columns = (*PEER_EVENTS, "unexplained")
        lines += ["", "| node | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for name, changes in sorted(self.peer_changes.items()):
            lines.append(f"| {name} | " + " | ".join(str(changes[e]) for e in columns) + " |")
        for what, items in (("orphans", self.orphans), ("false deaths", self.false_deaths)):
            lines += [f"{what}: {item}" for item in items]
        lines += [f"errors: {n} x {e}" for e, n in self.errors.most_common(10)]
        lines.append(f"mesh whole again at the end: {self.converged}")
        return "\n".join(lines)


def _epoch(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()


class Soak:
    """Owns the mesh's processes for one soak; :meth:`close` ends every one of them (and orphans)."""

    def __init__(
        self,
        tmp: Path,
        model: Path,
        kill_every: tuple[float, float],
        seed: int | None = None,
        schedule: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``schedule``: the first disruptions as (node, "SIGKILL" | "SIGTERM"), random ones after it."""
        self.tmp = tmp
        self.model = model
        self.model_name = model.stem  # the name a node serves a GGUF file under
        self.kill_every = kill_every
        self.rng = random.Random(seed)
        self.schedule = list(schedule)
        self.ports = {name: free_port() for name in (*ACTIVES, "s")}
        self.runs: list[Incarnation] = []
        self.current: dict[str, Incarnation] = {}
        self.tally = Tally()
        self.disruptions: list[tuple[float, str, str]] = []
        self.stop = threading.Event()
        self.t0 = time.time()
        self._lock = threading.Lock()

    # -- the mesh -------------------------------------------------------------------------------------

    def _extra(self, name: str) -> str:
        serve = f'[models]\nserve = ["{self.model}"]\n' if name in (*HOSTS, "s") else ""
        if name == "s":
            serve += "[standby]\npromote_window_s = 1.0\n"
        return serve

    def _node_extra(self, name: str) -> str:
        role = {"s": 'role = "standby"', "x": 'role = "client"', "y": 'role = "client"'}.get(name, "")
        return role

    def _write(self, name: str, join: tuple[str, ...]) -> Path:
        path = write_config(self.tmp, name, join, self._extra(name), self._node_extra(name))
        if name in self.ports:  # a fixed port: tokens to it stay valid across restarts
            text = path.read_text().replace(
                'quic_listen = "127.0.0.1:0"', f'quic_listen = "127.0.0.1:{self.ports[name]}"'
            )
            path.write_text(text)
        return path

    def _launch(self, name: str) -> Incarnation:
        config = self.tmp / f"{name}.toml"
        runs = sum(1 for inc in self.runs if inc.name == name)
        proc = NodeProcess(config, self.tmp / f"{name}.{runs}.log").start()
        inc = Incarnation(name, proc, time.time() - self.t0)
        with self._lock:
            self.runs.append(inc)
            self.current[name] = inc
        proc.wait_event("node.started", 60)
        return inc

    def start(self) -> None:
        """Bring the mesh up; returns once both clients answer."""
        self._write("a", ())
        a = self._launch("a")
        for name in ("b", "c"):
            self._write(name, (a.proc.token,))
            self._launch(name)
        # Every active joins through the others from now on: a restarted one finds the mesh whoever lives.
        for name in ACTIVES:
            others = tuple(self.current[o].proc.token for o in ACTIVES if o != name)
            self._write(name, others)
        self._write("s", tuple(self.current[o].proc.token_for("standby") for o in ACTIVES))
        self._launch("s")
        clients = tuple(self.current[o].proc.token_for("client") for o in ACTIVES)
        for name in ("x", "y"):
            self._write(name, clients)
            self._launch(name)
        for name in HOSTS:
            self.current[name].proc.wait_event("llama.ready", 60)
        for name in ("x", "y"):
            wait_until(lambda n=name: self._answers(n), 60, what=f"{name} to answer")
        # The standby must have found the mesh (it promotes only when a gap opens).
        wait_until(
            lambda: console_status(self.current["c"].proc.console_url)["standby_connections"] >= 1,
            30,
            what="the standby to be counted",
        )
        for inc in self.runs:
            inc.first = usage_of(self._pid(inc))

    def _answers(self, name: str) -> bool:
        client = self._openai(name, timeout=10)
        with contextlib.suppress(openai.APIError):
            return bool(client.completions.create(model=self.model_name, prompt="Once", max_tokens=2).choices)
        return False

    def _openai(self, name: str, timeout: float = 30) -> openai.OpenAI:
        api = str(self.current[name].proc.started["api"])
        return openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=timeout)

    @staticmethod
    def _pid(inc: Incarnation) -> int:
        assert inc.proc.proc is not None
        return inc.proc.proc.pid

    # -- load -----------------------------------------------------------------------------------------

    def _stream_loop(self, client_name: str) -> None:
        client = self._openai(client_name)
        while not self.stop.is_set():
            got_bytes = False
            try:
                finished = False
                stream = client.completions.create(
                    model=self.model_name,
                    prompt="Once upon a time",
                    max_tokens=24,
                    stream=True,
                    temperature=0,
                )
                for chunk in stream:
                    got_bytes = True
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finished = True
                if finished:
                    self.tally.add("complete")
                else:
                    self.tally.add(
                        "after_first_byte" if got_bytes else "before_first_byte", "ended without finish"
                    )
            except (openai.APIError, OSError) as exc:
                self.tally.add(
                    "after_first_byte" if got_bytes else "before_first_byte", f"{type(exc).__name__}: {exc}"
                )

    # -- chaos ----------------------------------------------------------------------------------------

    def _sample(self) -> None:
        """Every second: each live node's descendants (for orphans) and its latest resources."""
        while not self.stop.wait(1.0):
            with self._lock:
                live = [inc for inc in self.current.values() if not inc.ending]
            for inc in live:
                self._note_children(inc)
                use = usage_of(self._pid(inc))
                if use is not None and not inc.ending:  # not a reading of a process being signalled
                    inc.last = use

    def _note_children(self, inc: Incarnation) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self._pid(inc)).children(recursive=True):
                inc.children.setdefault(child.pid, child)

    def _disrupt(self) -> None:
        if self.schedule:
            name, how = self.schedule.pop(0)
        else:
            name, how = self.rng.choice(CHAOS_TARGETS), self.rng.choice(("SIGKILL", "SIGTERM"))
        inc = self.current[name]
        inc.last = usage_of(self._pid(inc)) or inc.last
        self._note_children(inc)
        marks = {n: len(i.proc.records()) for n, i in self.current.items() if n in ACTIVES and n != name}
        node_id = inc.proc.node_id
        self.disruptions.append((time.time() - self.t0, name, how))
        inc.ending = True
        os.kill(self._pid(inc), signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
        assert inc.proc.proc is not None
        inc.proc.proc.wait(30)
        inc.ended_at, inc.how_ended = time.time() - self.t0, how
        if name in ACTIVES:  # its peers noticed (died or left) before it comes back
            for other, mark in marks.items():
                wait_until(
                    lambda o=other, m=mark: any(
                        r.get("event") in ("peer.died", "peer.left") and r.get("peer") == node_id
                        for r in self.current[o].proc.records()[m:]
                    ),
                    30,
                    what=f"{other} to notice {name} gone",
                )
        new = self._launch(name)
        if name in HOSTS:
            new.proc.wait_event("llama.ready", 60)
        new.first = usage_of(self._pid(new))

    def _chaos_loop(self) -> None:
        while not self.stop.wait(self.rng.uniform(*self.kill_every)):
            self._disrupt()

    # -- the run --------------------------------------------------------------------------------------

    def run(self, seconds: float) -> SoakReport:
        self.start()
        t_start = time.time()
        self.t0 = t_start
        for inc in self.runs:
            inc.started_at = 0.0
        threads = [
            threading.Thread(target=self._stream_loop, args=(c,), daemon=True)
            for c in ("x", "y")
            for _ in range(STREAMS_PER_CLIENT)
        ]
        threads += [threading.Thread(target=self._sample, daemon=True)]
        for t in threads:
            t.start()
        chaos_error: list[BaseException] = []

        def chaos() -> None:
            try:
                self._chaos_loop()
            except BaseException as exc:  # reported by run(), not lost in a thread
                chaos_error.append(exc)
                self.stop.set()

        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
        self.stop.wait(seconds)
        self.stop.set()
        chaos_thread.join(180)
        for t in threads:
            t.join(60)
        if chaos_error:
            raise chaos_error[0]
        elapsed = time.time() - t_start
        converged = self._converged()
        for inc in self.current.values():
            inc.last = usage_of(self._pid(inc)) or inc.last
        return SoakReport(
            seconds=elapsed,
            requests=Counter(self.tally.counts),
            errors=Counter(self.tally.errors),
            disruptions=list(self.disruptions),
            incarnations=list(self.runs),
            orphans=self._orphans(),
            peer_changes=self._peer_changes(),
            false_deaths=self._false_deaths(),
            converged=converged,
        )

    def _converged(self) -> bool:
        """Within 30 s of the end, every active node lists the same members (a, b, c, and s if it was
        promoted), and no other: no ghost, nobody missing."""
        ids = {n: self.current[n].proc.node_id for n in (*ACTIVES, "s")}
        core = {ids[n] for n in ACTIVES}

        def whole() -> bool:
            views = [
                {p["node_id"] for p in console_status(self.current[n].proc.console_url)["peers"]} | {ids[n]}
                for n in ACTIVES
            ]
            return all(v == views[0] for v in views) and core <= views[0] <= core | {ids["s"]}

        try:
            wait_until(whole, 30, what="one mesh")
        except AssertionError:
            return False
        return True

    def _orphans(self) -> list[str]:
        def gone(child: psutil.Process) -> bool:
            try:
                return not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                return True

        found = []
        for inc in self.runs:
            if inc.ended_at is None:
                continue
            for child in inc.children.values():
                with contextlib.suppress(AssertionError):
                    wait_until(lambda c=child: gone(c), ORPHAN_GRACE_S, what="the child to end")
                if not gone(child):
                    with contextlib.suppress(psutil.Error):
                        found.append(
                            f"{inc.name} ({inc.how_ended}) left {child.pid}: {' '.join(child.cmdline()[:2])}"
                        )
        return found

    def _peer_changes(self) -> dict[str, Counter[str]]:
        """Per active node, the peer events it logged during the soak, and how many of them no
        disruption explains (flapping): per run of the node and per peer, more deaths or leaves than
        the peer's own ends in that time, or more joins than one per end (plus the first meeting)."""
        names = {inc.proc.node_id: inc.name for inc in self.runs}
        out: dict[str, Counter[str]] = {}
        for inc in self.runs:
            if inc.name not in ACTIVES:
                continue
            counts = out.setdefault(inc.name, Counter())
            per_peer: dict[str, Counter[str]] = {}
            for r in inc.proc.records():
                if r.get("event") in PEER_EVENTS and _epoch(r) >= self.t0:
                    counts[str(r["event"])] += 1
                    per_peer.setdefault(names.get(str(r.get("peer")), "?"), Counter())[str(r["event"])] += 1
            end = inc.ended_at if inc.ended_at is not None else float("inf")
            for peer, seen in per_peer.items():
                ends = sum(
                    1
                    for i in self.runs
                    if i.name == peer and i.ended_at is not None and inc.started_at <= i.ended_at <= end
                )
                gone = seen["peer.died"] + seen["peer.left"]
                counts["unexplained"] += max(0, gone - ends) + max(0, seen["peer.joined"] - gone - 1)
        return out

    def _false_deaths(self) -> list[str]:
        """``peer.died`` for a node whose process was running then (2 s of slack for clock reading)."""
        ids = {inc.proc.node_id: inc.name for inc in self.runs}
        down: dict[str, list[tuple[float, float]]] = {}
        for inc in self.runs:
            if inc.ended_at is not None:
                down.setdefault(inc.name, []).append(
                    (inc.ended_at + self.t0 - 2, inc.ended_at + self.t0 + 15)
                )
        found = []
        for inc in self.runs:
            for r in inc.proc.events("peer.died"):
                victim = ids.get(str(r.get("peer")), "?")
                t = _epoch(r)
                if t < self.t0:
                    continue
                # a true death is declared within seconds of the victim's end (dead_after_s 3.5 s, a loaded
                # machine's lag): its next run may have started already
                if not any(lo <= t <= hi for lo, hi in down.get(victim, [])):
                    found.append(
                        f"{inc.name} declared {victim} dead at {t - self.t0:.1f}s ({r.get('reason')})"
                    )
        return found

    def close(self) -> None:
        """SIGKILL every node's process group and any descendant still alive."""
        self.stop.set()
        for inc in self.runs:
            inc.proc.signal(signal.SIGKILL)
            if inc.proc.proc is not None:
                with contextlib.suppress(Exception):
                    inc.proc.proc.wait(10)
            for child in inc.children.values():
                with contextlib.suppress(psutil.Error):
                    child.kill()  # psutil refuses if the PID now belongs to another process
