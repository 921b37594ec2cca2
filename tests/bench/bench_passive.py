"""Passive-connection benchmark (prints figures, asserts nothing).

One active node process ``A`` (``meshllm run``) joined by one more active node ``B``, and 1000
passive QUIC connections held against ``A`` by load processes (``tests.bench.passive_load``, 2 of
500 by default), each authenticated with a route request like a passive node's. Reported:

- A's peer-list size (``/api/status`` ``peers``; must stay = 1, the active peer B) and its
  ``connections`` / ``passive_connections``;
- probes and gossip frames A sends per minute with 0 and with 1000 passive connections, over
  ``--window`` seconds each (must not grow);
- A's RSS and USS with 0, 100 and 1000 passive connections, and the memory per passive connection;
- route-request latency p50/p99 while all 1000 refresh: all at once, and spread over a few seconds.

Where the numbers come from: ``peers``/``connections``/``passive_connections`` from A's console
(``GET /api/status``); RSS/USS from psutil on A's pid; probes and frames from A's own TransportStats
(the console does not expose them). For that A is started as ``python -m tests.bench.bench_passive
--serve-node CONFIG --stats FILE``: that runs the unchanged ``meshllm run`` CLI (``meshllm.cli.main``)
in the process, plus one thread that writes A's ``GetTransportStats`` answer to FILE every 0.5 s.

Also printed: UDP datagrams the kernel dropped at A's socket (``/proc/net/udp``), A's CPU time, its
garbage-collector pauses (a ``gc.callbacks`` hook in the same stats thread) and how late the load
processes sent their requests (a stalled load would turn a spread round into a burst).

``--death`` instead measures the refresh after a death notice: a third active node C is killed while
the passive connections are held on A, A pushes the notice down each of them, and each reads it as a
passive node does (the table pushed with it, or a route request within ``--pull-spread`` s when none
came); it reports when the notices arrived, the route requests made, A's CPU, UDP drops at A's socket
and false deaths (B judges deaths slower than A, so that A is always the one that broadcasts).
For 5,000 connections use more load processes: ``--death --clients 5000 --loads 5``.

``--trace N`` instead runs A under tracemalloc (N frames) and prints what the passive connections
and a refresh round allocate, by source line (RSS figures are then inflated by tracemalloc itself).
``--profile`` runs cProfile on A's QUIC loop thread during each refresh round.

Run: .venv/bin/python -m tests.bench.bench_passive [--clients 1000] [--loads 2] [--window 30] [--death]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import functools
import gc
import io
import itertools
import json
import os
import pstats
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from meshllm.wire.invite import InviteToken
from tests.support import REPO, NodeProcess, ProcessFactory, exit_cleanly_on_sigterm, wait_until, write_config

# -- the node under test: `meshllm run` plus a stats thread ------------------------------------------------


def serve_node(config: str, stats_path: str, trace_frames: int) -> None:
    """Run ``meshllm run --config CONFIG`` in this process and publish the node's TransportStats."""
    if trace_frames:
        import tracemalloc

        tracemalloc.start(trace_frames)
    import meshllm.cli as cli
    from meshllm.wire.messages import GetTransportStats, TransportStats

    holder: dict[str, Any] = {}

    class RecordingNode(cli.Node):  # type: ignore[misc, name-defined]
        def start(self) -> Any:
            holder["node"] = self
            return super().start()

    cli.Node = RecordingNode  # type: ignore[attr-defined]
    snap_requested = threading.Event()
    profile_toggled = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: snap_requested.set())
    signal.signal(signal.SIGUSR2, lambda *_: profile_toggled.set())

    # GC pauses stop every thread of the node (the QUIC loop included): count them, keep the big ones.
    gc_pauses: dict[str, Any] = {"count": [0, 0, 0], "total_s": [0.0, 0.0, 0.0], "gen2": []}
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
            return
        took, gen = time.perf_counter() - gc_started[0], info["generation"]
        gc_pauses["count"][gen] += 1
        gc_pauses["total_s"][gen] += took
        if gen == 2:
            gc_pauses["gen2"] = [*gc_pauses["gen2"][-99:], [time.time(), took]]

    gc.callbacks.append(on_gc)

    lag = {"max_ms": 0.0}

    def watch_loop() -> None:
        """How late the node's QUIC loop runs a callback, every 50 ms (the worst since start)."""
        while True:
            time.sleep(0.05)
            node = holder.get("node")
            if node is None or not node._started:
                continue
            t0 = time.perf_counter()
            with contextlib.suppress(Exception):
                node.endpoint.loop_thread.run(_call(lambda: None), timeout=60)
                lag["max_ms"] = max(lag["max_ms"], (time.perf_counter() - t0) * 1000)

    threading.Thread(target=watch_loop, name="bench-loop-lag", daemon=True).start()

    def publish() -> None:
        snaps: list[Any] = []
        profiles: list[cProfile.Profile] = []
        profiling: cProfile.Profile | None = None
        while True:
            time.sleep(0.5)
            node = holder.get("node")
            if node is None or not node._started:
                continue
            if profile_toggled.is_set():
                profile_toggled.clear()
                # cProfile follows one thread: switch it on and off on the QUIC loop thread itself.
                if profiling is None:
                    profiling = cProfile.Profile()
                    node.endpoint.loop_thread.run(_call(profiling.enable), timeout=30)
                else:
                    node.endpoint.loop_thread.run(_call(profiling.disable), timeout=30)
                    _profile_report(profiling, f"{stats_path}.prof{len(profiles)}.txt")
                    profiles.append(profiling)
                    profiling = None
            try:
                s = node.directory.ask("transport", GetTransportStats(), TransportStats, 5)
            except Exception:
                continue
            if isinstance(s, TransportStats):
                body = {
                    "t": time.time(),
                    "probes_sent": s.probes_sent,
                    "frames_sent": s.frames_sent,
                    "frames_received": s.frames_received,
                    "bytes_sent": s.bytes_sent,
                    "connections": s.connections,
                    "passive_connections": s.passive_connections,
                    "gc": gc_pauses,
                    "loop_lag_max_ms": lag["max_ms"],
                }
                tmp = stats_path + ".tmp"
                Path(tmp).write_text(json.dumps(body))
                os.replace(tmp, stats_path)
            if snap_requested.is_set():
                snap_requested.clear()
                snaps.append(_snapshot_report(snaps, f"{stats_path}.snap{len(snaps)}.txt"))

    threading.Thread(target=publish, name="bench-stats", daemon=True).start()
    sys.argv = ["meshllm", "run", "--config", config]
    cli.main()


async def _call(fn: Any) -> None:
    fn()


def _profile_report(profile: cProfile.Profile, path: str) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    Path(path).write_text(out.getvalue())


def _snapshot_report(previous: list[Any], path: str) -> Any:
    import linecache
    import tracemalloc

    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, linecache.__file__),  # our own report reads source lines
            tracemalloc.Filter(False, "<frozen *>"),
        ]
    )
    lines = [f"traced now: {sum(s.size for s in snap.statistics('filename')) / 2**20:.1f} MiB"]
    if previous:
        base = previous[-1]
        for key, top in (("filename", 15), ("lineno", 30)):
            diff = snap.compare_to(base, key)
            total = sum(d.size_diff for d in diff)
            lines.append(f"-- growth since previous snapshot by {key}: total {total / 1024:.0f} KiB --")
            for d in diff[:top]:
                frame = d.traceback[0]
                lines.append(
                    f"{d.size_diff / 1024:>10.1f} KiB {d.count_diff:>+8d} blocks  {frame.filename}:{frame.lineno}"
                )
        diff = snap.compare_to(base, "traceback")
        lines.append("-- top growth by traceback --")
        for d in diff[:8]:
            lines.append(f"{d.size_diff / 1024:>10.1f} KiB {d.count_diff:>+8d} blocks")
            lines.extend("      " + text for text in d.traceback.format()[-12:])
    Path(path).write_text("\n".join(lines) + "\n")
    return snap


class StatsNodeProcess(NodeProcess):
    """NodeProcess whose command is ``serve_node`` (``meshllm run`` plus the stats thread)."""

    def __init__(self, config: Path, log: Path, stats: Path, trace_frames: int) -> None:
        super().__init__(config, log)
        self.stats_path = stats
        self.trace_frames = trace_frames

    def start(self) -> StatsNodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "tests.bench.bench_passive", "--serve-node", str(self.config)]
        cmd += ["--stats", str(self.stats_path), "--trace-frames", str(self.trace_frames)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        return self

    def stats(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.stats_path.read_text())
        return body

    def fresh_stats(self) -> dict[str, Any]:
        """A stats sample taken after this call (they come every 0.5 s)."""
        now = time.time()
        return wait_until(
            lambda: (s := self.stats())["t"] > now and s, timeout=15, interval=0.05, what="stats"
        )


# -- load processes ------------------------------------------------------------------------------------------


class LoadProcess:
    def __init__(self, token: InviteToken, host: str, port: int, log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        args = [host, str(port), token.encode()]  # the load's clients present its grant
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.passive_load", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=REPO,
            start_new_session=True,
        )

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError("load process did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load process exited ({self.proc.poll()})")
        body: dict[str, Any] = json.loads(line)
        return body

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.send({"cmd": "close"})
            self.receive(time.monotonic() + 5)
        with contextlib.suppress(Exception):
            self.proc.wait(5)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


def ask_all(loads: list[LoadProcess], cmds: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    for load, cmd in zip(loads, cmds, strict=True):
        load.send(cmd)
    deadline = time.monotonic() + timeout
    return [load.receive(deadline) for load in loads]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- measurements ----------------------------------------------------------------------------------------------


def gc_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A's GC work between two stats samples: collections per generation, total and longest pause."""
    b, a = before["gc"], after["gc"]
    counts = [a["count"][g] - b["count"][g] for g in range(3)]
    total_ms = sum(a["total_s"][g] - b["total_s"][g] for g in range(3)) * 1000
    full = [d for t, d in a["gen2"] if t > before["t"]]
    longest = f", longest full collection {max(full) * 1000:.0f} ms" if full else ""
    return (
        f"A GC: {counts[0]}/{counts[1]}/{counts[2]} collections (gen0/1/2), {total_ms:.0f} ms in all{longest}"
    )


def phase(title: str) -> None:
    """A phase header with the wall-clock time (UTC, as in the nodes' logs)."""
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 10)}"
    print(f"{title} [{stamp}Z]", flush=True)


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def settle_memory(proc: psutil.Process, max_s: float = 20.0) -> tuple[int, int]:
    """RSS and USS once RSS has moved less than 256 KiB over 3 s (or after ``max_s``)."""
    samples: list[int] = []
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        samples.append(proc.memory_info().rss)
        if len(samples) >= 7 and max(samples[-7:]) - min(samples[-7:]) < 256 * 1024:
            break
        time.sleep(0.5)
    full = proc.memory_full_info()
    return full.rss, full.uss


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to ``port`` (receive buffer full), from
    the ``drops`` column of /proc/net/udp{,6}."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port:
                    drops += int(cols[-1])
    return drops


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def lat_line(label: str, values: list[float]) -> str:
    return (
        f"{label}: n={len(values)} p50 {percentile(values, 50):.1f} ms, p90 {percentile(values, 90):.1f} ms, "
        f"p99 {percentile(values, 99):.1f} ms, max {max(values, default=float('nan')):.1f} ms"
    )


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.factory = ProcessFactory(tmp)
        self.loads: list[LoadProcess] = []
        self.a: StatsNodeProcess | None = None
        self.port = 0
        self._closed = threading.Lock()

    def close(self) -> None:
        if not self._closed.acquire(blocking=False):
            return
        for load in self.loads:
            load.stop()
        self.factory.close()

    def status(self) -> dict[str, Any]:
        assert self.a is not None
        return http_json(self.a.console_url + "/api/status")

    def window(self, seconds: float, label: str, proc: psutil.Process) -> None:
        """Probes and frames A sends per minute, from its TransportStats over ``seconds``."""
        assert self.a is not None
        before, cpu0, drops0 = self.a.fresh_stats(), proc.cpu_times(), udp_drops(self.port)
        time.sleep(seconds)
        after, cpu1, drops1 = self.a.fresh_stats(), proc.cpu_times(), udp_drops(self.port)
        span = after["t"] - before["t"]
        per_min = 60.0 / span
        kinds = sorted(set(after["frames_sent"]) | set(before["frames_sent"]))
        frames = {k: after["frames_sent"].get(k, 0) - before["frames_sent"].get(k, 0) for k in kinds}
        probes = after["probes_sent"] - before["probes_sent"]
        gossip_bytes = after["bytes_sent"].get("GOSSIP", 0) - before["bytes_sent"].get("GOSSIP", 0)
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        other = ", ".join(f"{k} {v * per_min:.0f}" for k, v in frames.items() if k != "GOSSIP") or "none"
        print(
            f"  [{label}] over {span:.1f} s: probes/min {probes * per_min:.0f}, gossip frames/min "
            f"{frames.get('GOSSIP', 0) * per_min:.0f} ({gossip_bytes * per_min / 1024:.1f} KiB/min); "
            f"other frames/min: {other}; A CPU {100 * cpu / span:.1f}% of one core; "
            f"UDP drops at A's socket {drops1 - drops0}"
        )
        print(f"  [{label}] {gc_line(before, after)}")

    def toggle_profile(self) -> str:
        """Start or stop cProfile on A's QUIC loop thread; stopping returns the report."""
        assert self.a is not None and self.a.proc is not None
        self._profile_toggles = getattr(self, "_profile_toggles", 0) + 1
        os.kill(self.a.proc.pid, signal.SIGUSR2)
        if self._profile_toggles % 2:
            time.sleep(1.5)  # the stats thread switches it on within 0.5 s
            return ""
        path = Path(f"{self.a.stats_path}.prof{self._profile_toggles // 2 - 1}.txt")
        wait_until(path.exists, timeout=30, interval=0.2, what="profile report")
        time.sleep(0.3)
        return path.read_text()

    def passive_count_is(self, n: int) -> bool:
        return bool(self.status().get("passive_connections") == n)

    def show_status(self, label: str) -> dict[str, Any]:
        assert self.a is not None
        s = self.status()
        events = Counter(
            r.get("event")
            for r in self.a.records()
            if r.get("level") in ("warning", "error") or str(r.get("event", "")).startswith("peer.")
        )
        print(
            f"  [{label}] /api/status: peers={len(s['peers'])} connections={s.get('connections')} "
            f"passive_connections={s.get('passive_connections')}; A's log so far: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(events.items())) or "-")
        )
        return s

    def run(self) -> None:
        args = self.args
        t_start = time.monotonic()
        config = write_config(self.tmp, "a")
        self.a = StatsNodeProcess(config, self.tmp / "a.log", self.tmp / "a.stats.json", args.trace)
        self.a.start()
        self.factory.procs.append(self.a)
        a = self.a
        token_text = a.token
        token = InviteToken.decode(token_text)
        started = a.started
        port = self.port = int(started["quic_port"])
        assert a.proc is not None
        proc = psutil.Process(a.proc.pid)
        # In --death mode B judges deaths slower than A, so that A is the one that finds C dead (and
        # broadcasts): the same sequence on every run, and on older code too.
        b_timing = "[timing]\ndead_after_s = 10.0\n" if args.death else ""
        b = self.factory.start("b", join=(token_text,), extra=b_timing)
        wait_until(lambda: len(self.status()["peers"]) == 1, timeout=60, what="A to see B")
        wait_until(lambda: a.stats()["connections"] >= 1, timeout=30, what="A's stats file")
        print(f"A: node {token.node_id[:12]} pid {proc.pid} quic 127.0.0.1:{port}; B: {b.node_id[:12]}")
        print(
            f"machine: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
            f"A, B and {args.loads} load processes share them (the load's CPU competes with A's)"
        )
        time.sleep(3.0)  # let startup allocations and B's join settle before the baseline

        if args.trace:
            self.trace_run(proc, token, port)
            return
        if args.death:
            self.death_run(proc, token, port, b)
            return

        phase(f"== 0 passive connections (window {args.window:.0f} s) ==")
        self.show_status("0 passive")
        rss0, uss0 = settle_memory(proc)
        print(f"  RSS {rss0 / 2**20:.1f} MiB, USS {uss0 / 2**20:.1f} MiB")
        self.window(args.window, "0 passive", proc)

        self.loads = [
            LoadProcess(token, "127.0.0.1", port, self.tmp / f"load{i}.log") for i in range(args.loads)
        ]
        memory = {0: (rss0, uss0)}
        first_ms: list[float] = []
        steps = [s for s in (100, args.clients) if s <= args.clients]
        held = 0
        for target in dict.fromkeys(steps):
            phase(f"== ramp to {target} passive connections ==")
            st0 = a.fresh_stats()
            cpu0, drops0 = proc.cpu_times(), udp_drops(port)
            add = split(target - held, len(self.loads))
            replies = ask_all(
                self.loads,
                [{"cmd": "connect", "n": n, "concurrency": args.concurrency} for n in add],
                timeout=240,
            )
            cpu1, drops1 = proc.cpu_times(), udp_drops(port)
            print(f"  {gc_line(st0, a.fresh_stats())}")
            for r in replies:
                first_ms += r["first_request_ms"]
            opened = sum(r["open"] for r in replies)
            failed = sum(r["failed"] for r in replies)
            secs = max(r["seconds"] for r in replies)
            cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            print(
                f"  load reports {opened} open, {failed} failed, in {secs:.1f} s "
                f"({(target - held) / secs:.0f} handshakes/s); A CPU {1000 * cpu / max(1, target - held):.2f} ms "
                f"per new connection; UDP drops at A's socket {drops1 - drops0}"
            )
            for r in replies:
                if r["errors"]:
                    print(f"  load errors: {r['errors']}")
            held = target
            try:
                wait_until(
                    functools.partial(self.passive_count_is, held),
                    timeout=20,
                    what=f"passive_connections == {held}",
                )
            except AssertionError as exc:
                print(f"  !! {exc}")
            s = self.show_status(f"{target} passive")
            memory[target] = settle_memory(proc)
            rss, uss = memory[target]
            print(
                f"  RSS {rss / 2**20:.1f} MiB, USS {uss / 2**20:.1f} MiB "
                f"(passive_connections={s.get('passive_connections')})"
            )
        print(lat_line("  first route request (handshake + Hello + table)", first_ms))

        phase(f"== {args.clients} passive connections held (window {args.window:.0f} s) ==")
        self.window(args.window, f"{args.clients} passive", proc)
        self.show_status(f"{args.clients} passive, after window")

        rounds: list[tuple[str, float]] = [("all at once", 0.0)] + [
            (f"spread over {s:g} s", s) for s in args.spread
        ]
        refresh_rss: list[int] = []
        for label, spread in rounds:
            phase(f"== refresh: every connection sends a route request, {label} ==")
            if args.profile:
                self.toggle_profile()
            st0 = a.fresh_stats()
            cpu0, drops0 = proc.cpu_times(), udp_drops(port)
            replies = ask_all(self.loads, [{"cmd": "refresh", "spread_s": spread}] * len(self.loads), 120)
            cpu1, drops1 = proc.cpu_times(), udp_drops(port)
            st1 = a.fresh_stats()
            if args.profile:
                print(self.toggle_profile().rstrip())
            lats = [x for r in replies for x in r["latencies_ms"]]
            failed = sum(r["failed"] for r in replies)
            secs = max(r["seconds"] for r in replies)
            load_cpu = sum(r["load_cpu_s"] for r in replies)
            cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            served = st1["frames_sent"].get("ROUTE_REQUEST", 0) - st0["frames_sent"].get("ROUTE_REQUEST", 0)
            print(
                lat_line("  route latency", lats)
                + f"; {failed} failed; UDP drops at A's socket {drops1 - drops0}"
            )
            late = [x for r in replies for x in r["late_ms"]]
            print(
                f"  took {secs:.2f} s; A CPU {cpu:.2f} s ({1000 * cpu / max(1, len(lats)):.2f} ms per request, "
                f"includes its background work), load processes CPU {load_cpu:.2f} s; "
                f"A answered {served} route requests"
            )
            print(
                f"  {gc_line(st0, st1)}; load sent requests later than planned by p50 "
                f"{percentile(late, 50):.1f} ms, max {max(late, default=0.0):.1f} ms"
            )
            for r in replies:
                if r["errors"]:
                    print(f"  load errors: {r['errors']}")
            refresh_rss.append(settle_memory(proc, max_s=8)[0])
        rss_n = memory[args.clients][0]
        print(
            "  RSS after each refresh round: "
            + ", ".join(f"{r / 2**20:.1f} MiB" for r in refresh_rss)
            + f" (+{(refresh_rss[-1] - rss_n) / 1024 / max(1, len(rounds)) / args.clients * 1024:.0f} B per "
            "connection per round)"
        )
        self.show_status("end")

        print("== summary ==")
        for n, (rss, uss) in memory.items():
            print(f"  {n:>5} passive: RSS {rss / 2**20:7.1f} MiB  USS {uss / 2**20:7.1f} MiB")
        keys = sorted(memory)
        for lo, hi in itertools.pairwise(keys):
            d_rss = (memory[hi][0] - memory[lo][0]) / (hi - lo)
            d_uss = (memory[hi][1] - memory[lo][1]) / (hi - lo)
            print(
                f"  per passive connection {lo}->{hi}: RSS {d_rss / 1024:.1f} KiB, USS {d_uss / 1024:.1f} KiB"
            )
        total = (memory[keys[-1]][0] - memory[0][0]) / keys[-1]
        print(f"  per passive connection 0->{keys[-1]}: RSS {total / 1024:.1f} KiB (goal <= 64 KiB)")
        print(f"  bench wall time {time.monotonic() - t_start:.0f} s")

    def death_run(self, proc: psutil.Process, token: InviteToken, port: int, b: NodeProcess) -> None:
        """The refresh after a death notice: a third active node C is killed (-9) while ``--clients``
        passive connections are held on A. A finds C dead and pushes the notice down every connection;
        each passive connection reads it as a passive node does (the table that came with it, or a
        route request within ``--pull-spread`` seconds when none came). Reported: how long after A
        declared the death the notices arrived, the route requests made instead (latency), A's CPU,
        UDP drops at A's socket, and deaths of the healthy A or B declared by either (false deaths)."""
        assert self.a is not None
        a, args = self.a, self.args
        c = self.factory.start("c", join=(a.token,))
        wait_until(lambda: len(self.status()["peers"]) == 2, timeout=60, what="A to see B and C")
        n = args.clients
        self.loads = [
            LoadProcess(token, "127.0.0.1", port, self.tmp / f"load{i}.log") for i in range(args.loads)
        ]
        phase(f"== ramp to {n} passive connections ==")
        replies = ask_all(
            self.loads,
            [{"cmd": "connect", "n": k, "concurrency": args.concurrency} for k in split(n, len(self.loads))],
            timeout=max(240, n / 10),
        )
        opened = sum(r["open"] for r in replies)
        print(
            f"  {opened} open, {sum(r['failed'] for r in replies)} failed, in "
            f"{max(r['seconds'] for r in replies):.1f} s; UDP drops at A's socket so far {udp_drops(port)}"
        )
        with contextlib.suppress(AssertionError):
            wait_until(functools.partial(self.passive_count_is, opened), timeout=30, what="passive count")
        self.show_status(f"{n} passive")
        time.sleep(3.0)  # let the ramp's work (and garbage) settle before the death

        phase(f"== C ({c.node_id[:12]}) killed; A pushes the death notice to {opened} passive connections ==")
        for load in self.loads:
            load.send({"cmd": "arm", "pull_spread_s": args.pull_spread})
        for load in self.loads:
            load.receive(time.monotonic() + 10)
        st0, cpu0, drops0 = a.fresh_stats(), proc.cpu_times(), udp_drops(port)
        since_a, since_b = len(a.records()), len(b.records())
        if args.profile:
            self.toggle_profile()
        c.kill9()
        died = a.wait_event("peer.died", timeout=30, since=since_a, peer=c.node_id)
        t_died = _wall(died["ts"])
        replies = ask_all(self.loads, [{"cmd": "notices", "timeout_s": 60}] * len(self.loads), 90)
        if args.profile:
            print(self.toggle_profile().rstrip())
        time.sleep(args.watch)  # false deaths come seconds after a stall
        cpu1, drops1, st1 = proc.cpu_times(), udp_drops(port), a.fresh_stats()
        notices = [x for r in replies for x in r["notices"]]
        delivery = [(x["t"] - t_died) * 1000 for x in notices]
        pushed = sum(1 for x in notices if x["pushed"])
        pulls = [x["pull_ms"] for x in notices if x["pull_ms"] is not None]
        errors = [x["error"] for x in notices if x["error"]]
        print(
            f"  A declared C dead: {died.get('reason')}; {len(notices)} of {sum(r['open'] for r in replies)} "
            f"connections had the notice, {pushed} with the table pushed, {len(pulls)} asked for it "
            f"(spread over {args.pull_spread:g} s), {len(errors)} requests failed {errors[:3]}"
        )
        print(lat_line("  notice arrived, after A declared the death", delivery))
        print(
            lat_line("  table in hand, after the notice arrived", [0.0] * pushed + [x for x in pulls])
            + " (0 for a table pushed with the notice; else when the pull was answered, spread included)"
        )
        if pulls:
            print(lat_line("  route requests made after the notice (request -> table)", pulls))
        cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        sent = st1["frames_sent"].get("PEER_DOWN", 0) - st0["frames_sent"].get("PEER_DOWN", 0)
        served = st1["frames_sent"].get("ROUTE_REQUEST", 0) - st0["frames_sent"].get("ROUTE_REQUEST", 0)
        false_a = [
            r for r in a.records()[since_a:] if r.get("event") == "peer.died" and r.get("peer") == b.node_id
        ]
        false_b = [
            r for r in b.records()[since_b:] if r.get("event") == "peer.died" and r.get("peer") == a.node_id
        ]
        disputed = [r for r in b.records()[since_b:] if r.get("event") == "peer.death_disputed"]
        print(
            f"  A CPU {cpu:.2f} s from the kill to {args.watch:g} s after the last notice; A sent {sent} PEER_DOWN "
            f"frames and answered {served} route requests; UDP drops at A's socket {drops1 - drops0}"
        )
        print(
            f"  A's QUIC loop ran a callback at worst {st1.get('loop_lag_max_ms', 0):.0f} ms late (since A started)"
        )
        print(
            f"  false deaths: A declared B dead x{len(false_a)}, B declared A dead x{len(false_b)} "
            f"(B disputed a death x{len(disputed)}); {gc_line(st0, st1)}"
        )
        self.show_status("end")

    def trace_run(self, proc: psutil.Process, token: InviteToken, port: int) -> None:
        """tracemalloc snapshots in A: at 0, after ``--clients`` connections, after two refresh rounds."""
        assert self.a is not None and self.a.proc is not None
        pid = self.a.proc.pid
        a = self.a

        def snapshot(k: int) -> str:
            path = Path(f"{a.stats_path}.snap{k}.txt")
            os.kill(pid, signal.SIGUSR1)
            wait_until(path.exists, timeout=120, interval=0.2, what=f"snapshot {k}")
            time.sleep(0.5)
            return path.read_text()

        print(f"== tracemalloc ({self.args.trace} frames) in A; RSS includes tracemalloc's own overhead ==")
        print(snapshot(0).rstrip())
        self.loads = [
            LoadProcess(token, "127.0.0.1", port, self.tmp / f"load{i}.log") for i in range(self.args.loads)
        ]
        n = self.args.clients
        replies = ask_all(
            self.loads,
            [
                {"cmd": "connect", "n": k, "concurrency": self.args.concurrency}
                for k in split(n, len(self.loads))
            ],
            240,
        )
        print(
            f"-- {sum(r['open'] for r in replies)} connections open ({sum(r['failed'] for r in replies)} failed)"
        )
        wait_until(lambda: self.status().get("passive_connections") == n, timeout=20, what="all passive")
        time.sleep(2)
        print(snapshot(1).rstrip())
        for _ in range(2):
            ask_all(self.loads, [{"cmd": "refresh", "spread_s": 2.0}] * len(self.loads), 120)
        time.sleep(2)
        print(f"-- after 2 refresh rounds of {n} route requests")
        print(snapshot(2).rstrip())
        print(f"  RSS now {proc.memory_info().rss / 2**20:.1f} MiB")


def _wall(ts: str) -> float:
    """A log record's ``ts`` (ISO 8601, UTC) as a Unix time."""
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000, help="passive connections to hold")
    parser.add_argument("--loads", type=int, default=2, help="load processes sharing the connections")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per probes/gossip window")
    parser.add_argument("--concurrency", type=int, default=16, help="handshakes in flight per load process")
    parser.add_argument(
        "--spread", type=float, nargs="*", default=[1.0, 5.0], help="refresh rounds spread over these seconds"
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile A's QUIC loop thread during each refresh round"
    )
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc frames in A (analysis run)")
    parser.add_argument(
        "--death", action="store_true", help="the refresh after a death notice (a third active node killed)"
    )
    parser.add_argument(
        "--pull-spread", type=float, default=2.0, help="--death: a connection given no table asks within this"
    )
    parser.add_argument("--watch", type=float, default=8.0, help="--death: s to watch for false deaths after")
    parser.add_argument("--deadline", type=float, default=460.0, help="kill everything after this many s")
    parser.add_argument("--keep", action="store_true", help="keep the temporary dir (node and load logs)")
    parser.add_argument("--serve-node", help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    parser.add_argument("--trace-frames", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_node:
        serve_node(args.serve_node, args.stats, args.trace_frames)
        return
    tmp = tempfile.mkdtemp(prefix="bench-passive-")
    if args.keep:
        print(f"logs and stats in {tmp}")
    try:
        bench = Bench(args, Path(tmp))

        def watchdog() -> None:
            print(f"!! deadline of {args.deadline:.0f} s reached: stopping everything", flush=True)
            bench.close()
            os._exit(3)

        timer = threading.Timer(args.deadline, watchdog)
        timer.daemon = True
        timer.start()
        try:
            bench.run()
        finally:
            timer.cancel()
            bench.close()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
