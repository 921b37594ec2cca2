"""Gateway and HTTP-tunnel overhead benchmark (prints figures, asserts nothing).

On one machine, same model (SmolLM2-135M) and prompt, streaming chat completions at temperature 0,
runs interleaved in a random order per round:

  (a) straight to node A's llama-server,
  (a2) the same again: an A/A control, whose ratio to (a) shows how far this bench's own noise moves a
      ratio in one run (``--no-control`` leaves it out),
  (b) through node A's gateway (A serves the model: gateway -> local llama-server),
  (c) through node B's gateway (B serves nothing: gateway -> tunnel -> A -> llama-server); the
      tunnel is the TLS-over-TCP fast path when it connects, else a QUIC stream; the run says which.

A and B are separate ``meshllm run`` processes (one GIL each). The client is the same for every
target: a fresh ``http.client`` connection per request, each SSE ``data:`` line timestamped as it
arrives. TTFT = request start (connect included) to the first event with content; tokens/s =
(content events - 1) / (last - first content event). llama-server's own ``timings`` (last event)
are printed alongside. Target for (b) and (c): tokens/s ratio >= 0.97 and added TTFT <= 5 ms. Ratios
and added TTFT are also given per round against the same round's direct answers ("paired": the mean of
(a) and (a2), or (a) alone without the control), with a 90% interval of their median from resampling the
rounds. The added TTFT is also given less llama-server's own prompt time (its ``timings.prompt_ms``),
which varies by a few ms from one answer to the next and is most of the TTFT's noise; the prompt-time
ratio beside it shows whether a path slows llama-server's prompt, which that figure would hide.

The nodes' access logs (``gateway.served``, ``tunnel.served``) give, request by request, how long each
node took from its handler to its first byte written; the run prints where (b)'s and (c)'s first byte
goes: outside the gateway's handler (connect, accept, HTTP parsing, the client's wake-up), in the
host's handler (mostly llama-server), and in the tunnel's hops between the two.

Per request it also records the CPU time each process spent (the bench client, node A, node B,
llama-server, the relay, and "other": everything else on the machine), since on a small machine the
relaying processes compete with llama-server's own threads. Rounds in which other processes took
over 5% of the CPU are left out of a second ratio table, and other benchmark or pytest runs are
warned about.

``--relays N`` adds (d): N plain TCP byte relays in a chain, each its own process, in front of
llama-server: asyncio protocols that write each read on from the transport's callback, as the nodes'
body pumps do, without TLS, routing or HTTP. A yardstick for what N extra process hops cost on this
machine whatever they do (2: the hops of the remote path (c)). ``--llama-threads 1`` sets A's
``[llama] threads``, and ``--llama-args '--poll 0'`` appends arguments to A's llama-server (through a
wrapper script in a ``[llama] bin_dir``), to see how much of a gap is CPU contention rather than
latency. ``--relay-threads 0`` runs both nodes with bodies passed on by the transport callback's pump
instead of relay threads (meshllm/net/thread_relay.py), for runs interleaved with default ones.
``--gap-ms 100`` waits before each request: back to back, a request starts while the last answer's
processes still wind down (connections closed, threads ended, logs written), and a path that reaches
llama-server later finds a quieter CPU for its prompt; the prompt-time ratio shows how much.

Run: .venv/bin/python -m tests.bench.bench_gateway [--rounds 20] [--warmup 2] [--max-tokens 64]
     [--relays 2] [--llama-threads 1] [--llama-args '--poll 0'] [--relay-threads 0] [--gap-ms 100]
     [--samples-out F]
Pool earlier runs: .venv/bin/python -m tests.bench.bench_gateway --pool F1 F2 ...
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from meshllm.serving.llama import find_binaries
from tests.support import ProcessFactory, exit_cleanly_on_sigterm, wait_until

MODEL = "smollm2-135m"
TARGET_RATIO = 0.97
TARGET_ADDED_TTFT_MS = 5.0
CLEAN_OTHER_SHARE = 0.05  # a round counts as clean when other processes took under 5% of the CPU
RESAMPLES = 2000  # bootstrap resamples of the rounds, for the 90% intervals
PROMPT = "Write a short story about a robot who learns to paint. Use simple words."
LABELS = {
    "a": "llama-server direct",
    "a2": "llama-server direct, again",
    "b": "local gateway (A)",
    "c": "remote gateway (B, tunnel)",
    "d": "plain TCP relay processes",
}

RELAY_SCRIPT = r"""
import asyncio, sys
UP = int(sys.argv[1])
class Pump(asyncio.Protocol):
    peer = None
    def __init__(self):
        self.held = []
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        if self.peer is None:
            self.held.append(data)
        else:
            self.peer.transport.write(data)
    def connection_lost(self, exc):
        if self.peer is not None:
            self.peer.transport.close()
class Downstream(Pump):
    def connection_made(self, transport):
        super().connection_made(transport)
        asyncio.ensure_future(self.dial())
    async def dial(self):
        up = Pump()
        up.peer = self
        await asyncio.get_running_loop().create_connection(lambda: up, "127.0.0.1", UP)
        self.peer = up
        for data in self.held:
            up.transport.write(data)
async def main():
    server = await asyncio.get_running_loop().create_server(Downstream, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


@dataclass
class Sample:
    ttft_s: float  # request start -> first content event
    first_byte_s: float  # request start -> first body line
    tokens_per_s: float  # client side, between first and last content event
    content_events: int
    events: int
    body_bytes: int
    total_s: float
    server_tps: float | None  # llama-server timings.predicted_per_second
    server_prompt_ms: float | None  # timings.prompt_ms
    text: str
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per process, during this request
    wait_ms: dict[str, float] = field(default_factory=dict)  # runnable but not running
    slices: dict[str, int] = field(default_factory=dict)  # times scheduled in


@dataclass
class Target:
    key: str
    host: str
    port: int
    path: str  # the chat completions path on that server
    samples: list[Sample] = field(default_factory=list)


def stream_chat(target: Target, max_tokens: int) -> Sample:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(target.host, target.port, timeout=120)
    try:
        conn.request(
            "POST",
            target.path,
            body=body,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{target.key}: HTTP {resp.status}: {resp.read()[:300]!r}")
        first_byte = None
        content_times: list[float] = []
        events = 0
        nbytes = 0
        parts: list[str] = []
        timings: dict[str, Any] = {}
        while line := resp.readline():
            now = time.perf_counter()
            if first_byte is None:
                first_byte = now
            nbytes += len(line)
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            events += 1
            if payload == b"[DONE]":
                continue
            chunk = json.loads(payload)
            if "timings" in chunk:
                timings = chunk["timings"]
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    content_times.append(now)
                    parts.append(content)
        end = time.perf_counter()
    finally:
        conn.close()
    if len(content_times) < 2:
        raise RuntimeError(f"{target.key}: only {len(content_times)} content events")
    span = content_times[-1] - content_times[0]
    return Sample(
        ttft_s=content_times[0] - t0,
        first_byte_s=(first_byte or end) - t0,
        tokens_per_s=(len(content_times) - 1) / span,
        content_events=len(content_times),
        events=events,
        body_bytes=nbytes,
        total_s=end - t0,
        server_tps=timings.get("predicted_per_second"),
        server_prompt_ms=timings.get("prompt_ms"),
        text="".join(parts),
    )


class CpuMeter:
    """Per named process, summed over its live threads from ``/proc/PID/task/TID/schedstat``: seconds on
    a CPU, seconds runnable but waiting for one (run-queue delay: contention), and times scheduled in
    (about one per wake-up). Without schedstat: psutil's user + system (10 ms ticks) and zeros."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {"client": os.getpid()}

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    @staticmethod
    def sched(pid: int) -> tuple[float, float, int]:
        cpu = wait = slices = 0
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    fields = (task / "schedstat").read_text().split()
                    cpu, wait, slices = cpu + int(fields[0]), wait + int(fields[1]), slices + int(fields[2])
                except (OSError, ValueError, IndexError):
                    continue  # the thread ended
        except OSError:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system), 0.0, 0
        return cpu / 1e9, wait / 1e9, slices

    def snapshot(self) -> dict[str, tuple[float, float, int]]:
        out = {name: self.sched(pid) for name, pid in self.pids.items()}
        t = psutil.cpu_times()  # the whole machine (10 ms ticks): "other" = busy - ours
        busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        out["machine"] = (busy, 0.0, 0)
        return out


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark or test runs on this machine (they skew every figure)."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or ()).replace("\n", " ")
        if proc.info["pid"] not in mine and ("tests.bench" in cmd or "pytest" in cmd):
            found.append(f"{proc.info['pid']}: {cmd[:100]}")
    return found


def measured(meter: CpuMeter, target: Target, max_tokens: int) -> Sample:
    before = meter.snapshot()
    sample = stream_chat(target, max_tokens)
    after = meter.snapshot()
    names = [k for k in before if k != "machine"]
    sample.cpu_ms = {k: (after[k][0] - before[k][0]) * 1e3 for k in names}
    sample.wait_ms = {k: (after[k][1] - before[k][1]) * 1e3 for k in names}
    sample.slices = {k: after[k][2] - before[k][2] for k in names}
    busy = (after["machine"][0] - before["machine"][0]) * 1e3
    sample.cpu_ms["other"] = max(0.0, busy - sum(sample.cpu_ms.values()))
    return sample


def llama_wrapper(tmp: Path, extra_args: str) -> Path:
    """A ``[llama] bin_dir`` whose llama-server is the real one with ``extra_args`` appended."""
    real = find_binaries()
    folder = tmp / "llama-bin"
    folder.mkdir()
    server = folder / "llama-server"
    server.write_text(f'#!/bin/sh\nexec "{real.server}" "$@" {extra_args}\n')
    server.chmod(0o755)
    (folder / real.rpc_server.name).symlink_to(real.rpc_server)
    return folder


def tunnel_transport(a_quic_port: int) -> str:
    """Which way B's tunnels to A went: TCP connections to A's QUIC port number (live or in TIME_WAIT)
    are the TLS fast path; none means QUIC streams."""
    tcp = [
        c
        for c in psutil.net_connections(kind="tcp")
        if c.raddr and a_quic_port in (c.raddr.port, c.laddr.port)
    ]
    if tcp:
        return f"TLS-over-TCP fast path ({len(tcp)} TCP connection ends on A's port {a_quic_port} seen)"
    return f"QUIC streams (no TCP connection to A's port {a_quic_port} seen)"


def served_models(api_url: str) -> set[str]:
    with urllib.request.urlopen(api_url + "/models", timeout=5) as resp:
        return {m["id"] for m in json.loads(resp.read())["data"]}


def target_from_url(key: str, url: str, path: str) -> Target:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return Target(key=key, host=parts.hostname, port=parts.port, path=path)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def report(targets: list[Target], rounds: int) -> None:
    base = targets[0]
    print()
    print(f"== per target, {rounds} measured rounds (median / p90) ==")
    header = (
        f"{'target':<30} {'TTFT ms':>16} {'1st byte ms':>16} {'tok/s client':>18} "
        f"{'tok/s server':>13} {'prompt ms':>10} {'total ms':>9} {'events':>7} {'bytes':>7}"
    )
    print(header)
    for t in targets:
        s = t.samples
        ttft = [x.ttft_s * 1e3 for x in s]
        fb = [x.first_byte_s * 1e3 for x in s]
        tps = [x.tokens_per_s for x in s]
        stps = [x.server_tps for x in s if x.server_tps is not None]
        pms = [x.server_prompt_ms for x in s if x.server_prompt_ms is not None]
        total = [x.total_s * 1e3 for x in s]
        print(
            f"{'(' + t.key + ') ' + LABELS[t.key]:<30} "
            f"{statistics.median(ttft):>7.1f} / {pct(ttft, 0.9):>6.1f} "
            f"{statistics.median(fb):>7.1f} / {pct(fb, 0.9):>6.1f} "
            f"{statistics.median(tps):>8.1f} / {pct(tps, 0.1):>7.1f}* "
            f"{statistics.median(stps) if stps else float('nan'):>12.1f} "
            f"{statistics.median(pms) if pms else float('nan'):>10.1f} "
            f"{statistics.median(total):>9.1f} "
            f"{statistics.mean(x.events for x in s):>7.1f} "
            f"{statistics.mean(x.body_bytes for x in s):>7.0f}"
        )
    print("  * for tokens/s the second figure is p10 (the slow tail); events and bytes are means")
    print(
        f"  content events per response (mean): {statistics.mean(x.content_events for x in base.samples):.1f}"
    )
    texts = {x.text for t in targets for x in t.samples}
    print(f"  distinct response texts over all targets and rounds: {len(texts)} (1 = same text everywhere)")

    names = list(base.samples[0].cpu_ms)
    print()
    print("== CPU ms per request by process (median; 'wall' = request duration) ==")
    print(f"{'target':<30} {'wall':>7} " + " ".join(f"{n:>8}" for n in names) + f" {'sum':>8}")
    for t in targets:
        cpu = {n: statistics.median(x.cpu_ms[n] for x in t.samples) for n in names}
        wall = statistics.median(x.total_s * 1e3 for x in t.samples)
        print(
            f"{'(' + t.key + ') ' + LABELS[t.key]:<30} {wall:>7.1f} "
            + " ".join(f"{cpu[n]:>8.1f}" for n in names)
            + f" {sum(cpu.values()):>8.1f}"
        )
    print(
        f"  machine: {os.cpu_count()} CPUs, so at most {os.cpu_count()} CPU-ms per wall-ms; 'other' = the "
        "machine's busy time (10 ms ticks) minus the processes named, i.e. anything else running"
    )
    procs = list(base.samples[0].slices)
    print()
    print(
        "== scheduling per request (median): run-queue wait ms (runnable, no CPU free) | times scheduled in =="
    )
    print(
        f"{'target':<30} " + " ".join(f"{n:>8}" for n in procs) + " | " + " ".join(f"{n:>8}" for n in procs)
    )
    for t in targets:
        wait = {n: statistics.median(x.wait_ms[n] for x in t.samples) for n in procs}
        slices = {n: statistics.median(x.slices[n] for x in t.samples) for n in procs}
        print(
            f"{'(' + t.key + ') ' + LABELS[t.key]:<30} "
            + " ".join(f"{wait[n]:>8.1f}" for n in procs)
            + " | "
            + " ".join(f"{slices[n]:>8.0f}" for n in procs)
        )

    print()
    ratios(targets, list(range(rounds)), "== relative to the direct answers ==")
    print()
    beyond_prompt(targets, list(range(rounds)))
    busy = [
        sum(t.samples[i].cpu_ms["other"] for t in targets) / sum(t.samples[i].total_s * 1e3 for t in targets)
        for i in range(rounds)
    ]
    clean = [i for i in range(rounds) if busy[i] < CLEAN_OTHER_SHARE]
    if len(clean) < rounds:
        print()
        ratios(
            targets,
            clean,
            f"== relative to the direct answers, only the {len(clean)} of {rounds} rounds where other processes used "
            f"< {CLEAN_OTHER_SHARE:.0%} of the CPU ==",
        )


def ratios(targets: list[Target], rounds: list[int], title: str) -> None:
    print(title)
    if not rounds:
        print("  (none)")
        return
    print(
        f"{'target':<40} {'tok/s ratio':>11} {'paired ratio':>12} {'90% interval':>13} {'+TTFT ms':>9} "
        f"{'paired +TTFT ms':>15} {'90% interval':>13} {'paired p90':>10} {'verdict':>8}"
    )
    for t in targets[1:]:
        mine = [t.samples[i] for i in rounds]
        ref = reference(targets, rounds, t.key)
        tps_ratio = statistics.median(x.tokens_per_s for x in mine) / statistics.median(r[0] for r in ref)
        add_ttft = (statistics.median(x.ttft_s for x in mine) - statistics.median(r[1] for r in ref)) * 1e3
        # Paired per round: the same round's direct answers are the nearest comparison under CPU noise.
        paired_ratio = [x.tokens_per_s / r[0] for x, r in zip(mine, ref, strict=True)]
        paired_add = [(x.ttft_s - r[1]) * 1e3 for x, r in zip(mine, ref, strict=True)]
        ok = tps_ratio >= TARGET_RATIO and add_ttft <= TARGET_ADDED_TTFT_MS
        lo, hi = median_interval(paired_ratio)
        add_lo, add_hi = median_interval(paired_add)
        print(
            f"{row_label(targets, t.key):<40} {tps_ratio:>11.3f} "
            f"{statistics.median(paired_ratio):>12.3f} {lo:>6.3f}-{hi:<6.3f} {add_ttft:>9.1f} "
            f"{statistics.median(paired_add):>15.1f} {add_lo:>6.1f}-{add_hi:<6.1f} "
            f"{pct(paired_add, 0.9):>10.1f} {'' if t.key == 'a2' else 'meets' if ok else 'MISSES':>8}"
        )
    print(f"  target for (b) and (c): tokens/s ratio >= {TARGET_RATIO} and added TTFT <= {TARGET_ADDED_TTFT_MS:g} ms")
    print(
        "  90% interval: of the paired median, by resampling the rounds; (a2) is (a) measured again in the same"
        " rounds, so its spread is the bench's own; (a,a2): the mean of both in each round"
    )


def reference(targets: list[Target], rounds: list[int], key: str) -> list[tuple[float, float, float]]:
    """Per round, the direct answer a target is compared with (tokens/s, TTFT s, llama-server's prompt
    ms): the mean of (a) and (a2) when the control ran (two samples of the same thing: half the noise of
    one), (a) for (a2)."""
    direct = [targets[0].samples[i] for i in rounds]
    control = next((t for t in targets if t.key == "a2"), None)
    if control is None or key == "a2":
        return [(x.tokens_per_s, x.ttft_s, prompt_ms(x)) for x in direct]
    again = [control.samples[i] for i in rounds]
    return [
        ((x.tokens_per_s + y.tokens_per_s) / 2, (x.ttft_s + y.ttft_s) / 2, (prompt_ms(x) + prompt_ms(y)) / 2)
        for x, y in zip(direct, again, strict=True)
    ]


def prompt_ms(sample: Sample) -> float:
    return sample.server_prompt_ms if sample.server_prompt_ms is not None else math.nan


def beyond_prompt(targets: list[Target], rounds: list[int]) -> None:
    """The added TTFT less llama-server's own prompt time, paired per round. The prompt time of the
    same request varies by a few ms from one answer to the next, and that is most of the TTFT's noise:
    taking it out (a control variate) leaves what the path adds with a much tighter interval. It would
    hide a path that slows llama-server's prompt (CPU contention), so the prompt-time ratio is beside it."""
    print(
        "== added TTFT beyond llama-server's own prompt time (TTFT - timings.prompt_ms), paired per round =="
    )
    print(
        f"{'target':<40} {'+TTFT ms':>9} {'90% interval':>13} {'prompt time ratio':>17} {'90% interval':>13}"
    )
    for t in targets[1:]:
        mine = [t.samples[i] for i in rounds]
        pairs = [
            (x, r)
            for x, r in zip(mine, reference(targets, rounds, t.key), strict=True)
            if not math.isnan(prompt_ms(x) + r[2])
        ]
        if not pairs:
            print(f"  ({t.key}): llama-server gave no prompt times")
            continue
        added = [(x.ttft_s - r[1]) * 1e3 - (prompt_ms(x) - r[2]) for x, r in pairs]
        prompt = [prompt_ms(x) / r[2] for x, r in pairs]
        print(f"{row_label(targets, t.key):<40} {with_interval(added, 9, 2)} {with_interval(prompt, 17, 3)}")


def row_label(targets: list[Target], key: str) -> str:
    """``(c)/(a,a2) remote gateway (B, tunnel)``: a target, what it is compared with, what it is."""
    return f"({key})/{reference_name(targets, key)} {LABELS[key]}"


def with_interval(values: list[float], width: int, digits: int) -> str:
    """The median of ``values`` and its 90% interval, as table columns."""
    lo, hi = median_interval(values)
    return f"{statistics.median(values):>{width}.{digits}f} {lo:>6.{digits}f}-{hi:<6.{digits}f}"


def reference_name(targets: list[Target], key: str) -> str:
    return "(a,a2)" if key != "a2" and any(t.key == "a2" for t in targets) else "(a)"


def median_interval(values: list[float], seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of the median of ``values`` resampled with replacement (a bootstrap):
    how far a run of this many rounds could put the median by chance."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(RESAMPLES))
    return pct(medians, 0.05), pct(medians, 0.95)


def stages(targets: list[Target], a_log: list[dict[str, Any]], b_log: list[dict[str, Any]]) -> None:
    """Where a gateway path's time to the first byte goes, request by request: the client's first byte
    against the nodes' access-log lines for the same requests (``gateway.served``, ``tunnel.served``:
    meshllm/serving/request_log.py), which time from each node's handler to its first byte written.
    Requests are sequential, so the last lines of each kind are the measured rounds' answers."""
    by_key = {t.key: t for t in targets}
    gateway_lines = {
        "b": [r for r in a_log if r.get("event") == "gateway.served" and r.get("via") == "local"],
        "c": [r for r in b_log if r.get("event") == "gateway.served"],
    }
    host_lines = [r for r in a_log if r.get("event") == "tunnel.served"]
    print("== the first byte's time by stage, from the nodes' access logs (median ms per request) ==")
    print(
        f"{'target':<32} {'client 1st byte':>15} {'outside handler':>15} {'gateway handler':>15} "
        f"{'host handler':>12} {'tunnel hops':>11}"
    )
    for key, lines in gateway_lines.items():
        t = by_key.get(key)
        if t is None:
            continue
        n = len(t.samples)
        host = host_lines[-n:] if key == "c" else []
        if len(lines) < n or (key == "c" and len(host) < n):
            print(f"({key}): {len(lines)} access-log lines for {n} requests, not paired")
            continue
        client = [x.first_byte_s * 1e3 for x in t.samples]
        gateway = [float(r["first_byte_ms"]) for r in lines[-n:]]
        outside = [c - g for c, g in zip(client, gateway, strict=True)]
        row = f"({key}) {LABELS[key]:<28} {statistics.median(client):>15.2f} {statistics.median(outside):>15.2f} "
        row += f"{statistics.median(gateway):>15.2f}"
        if host:
            answered = [float(r["first_byte_ms"]) for r in host]
            hops = [g - h for g, h in zip(gateway, answered, strict=True)]
            row += f" {statistics.median(answered):>12.2f} {statistics.median(hops):>11.2f}"
        print(row)
    print(
        "  outside handler: the client's first byte less the gateway's (connect, accept, HTTP parsing, "
        "the client's wake-up); gateway handler: its handler to the first byte written to the client; "
        "host handler: the host's tunnel header read to the first byte sent back (llama-server's work "
        "and the host's own); tunnel hops: the gateway's less the host's (routing, the tunnel both ways)"
    )


def summary(targets: list[Target]) -> None:
    """One line per gateway path, for comparing runs: paired tokens/s ratio and added TTFT (medians over
    rounds, against :func:`reference`), and the CPU each node process spent per response (median ms)."""
    rounds = list(range(len(targets[0].samples)))
    for t in targets[1:]:
        ref = reference(targets, rounds, t.key)
        paired = [x.tokens_per_s / r[0] for x, r in zip(t.samples, ref, strict=True)]
        lo, hi = median_interval(paired)
        ttft = statistics.median((x.ttft_s - r[1]) * 1e3 for x, r in zip(t.samples, ref, strict=True))
        names = ["node A", "node B"] if t.key != "d" else [k for k in t.samples[0].cpu_ms if k.startswith("relay")]
        cpu = ", ".join(f"{name} {statistics.median(x.cpu_ms[name] for x in t.samples):.1f} ms" for name in names)
        print(
            f"SUMMARY ({t.key}) {LABELS[t.key]}: tok/s ratio to {reference_name(targets, t.key)} "
            f"{statistics.median(paired):.3f} "
            f"(90% {lo:.3f}-{hi:.3f})  +TTFT {ttft:.1f} ms  CPU per response: {cpu}"
        )


def save_samples(path: Path, targets: list[Target]) -> None:
    rounds = {t.key: [asdict(x) for x in t.samples] for t in targets}
    path.write_text(json.dumps({"labels": {t.key: LABELS[t.key] for t in targets}, "rounds": rounds}))
    print(f"  rounds written to {path}")


def pool(paths: list[Path]) -> None:
    """The ratios of several runs' rounds taken together: a tighter interval than one run's, and the
    drift between runs (which a run's own interval does not see) averaged in."""
    pooled: dict[str, Target] = {}
    for path in paths:
        saved = json.loads(path.read_text())
        keys = list(saved["rounds"])
        if pooled and keys != list(pooled):
            raise SystemExit(f"{path}: targets {keys}, not {list(pooled)} as in the files before it")
        for key in keys:
            LABELS.setdefault(key, saved["labels"][key])
            target = pooled.setdefault(key, Target(key, "", 0, ""))
            target.samples += [Sample(**x) for x in saved["rounds"][key]]
    targets = list(pooled.values())
    rounds = len(targets[0].samples)
    ratios(targets, list(range(rounds)), f"== relative to the direct answers, {rounds} rounds of {len(paths)} runs pooled ==")
    print()
    beyond_prompt(targets, list(range(rounds)))
    print()
    summary(targets)


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0,
        help="wait this long before each request, so that it starts on a machine at rest (0: at once)",
    )
    parser.add_argument("--relays", type=int, default=0, help="add (d): N plain TCP relay processes in a chain")
    parser.add_argument("--llama-threads", type=int, default=0, help="[llama] threads for A (0: default)")
    parser.add_argument(
        "--llama-args", default="", help="extra llama-server arguments, e.g. '-t 1' or '--poll 0'"
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="leave out (a2), llama-server direct measured a second time (the bench's own noise)",
    )
    parser.add_argument(
        "--relay-threads", type=int, default=None, help="MESHLLM_RELAY_THREADS for both nodes (0: callback pump)"
    )
    parser.add_argument("--samples-out", type=Path, help="write every measured round to this JSON file")
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="start nothing: pool the rounds of earlier runs' --samples-out files and print their ratios",
    )
    args = parser.parse_args()
    if args.pool:
        pool(args.pool)
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        factory = ProcessFactory(tmp)
        relays: list[subprocess.Popen[bytes]] = []
        try:
            t_start = time.monotonic()
            extra = f'\n[models]\nserve = ["{MODEL}"]\n'
            llama = []
            if args.llama_threads:
                llama.append(f"threads = {args.llama_threads}")
            if args.llama_args:
                llama.append(f'bin_dir = "{llama_wrapper(tmp, args.llama_args)}"')
            if llama:
                extra += "\n[llama]\n" + "\n".join(llama) + "\n"
            env = {} if args.relay_threads is None else {"MESHLLM_RELAY_THREADS": str(args.relay_threads)}
            a = factory.start("a", extra=extra, env=env)
            b = factory.start("b", join=(a.token,), env=env)
            ready = a.wait_event("llama.ready", timeout=180, kind="llama-server")
            llama_port = int(ready["port"])
            a_api = str(a.started["api"])
            b_api = str(b.started["api"])
            wait_until(lambda: MODEL in served_models(b_api), timeout=60, what=f"B to list {MODEL}")
            print(
                f"nodes up in {time.monotonic() - t_start:.1f}s: llama-server 127.0.0.1:{llama_port}, "
                f"A {a_api}, B {b_api}"
            )
            targets = [
                Target("a", "127.0.0.1", llama_port, "/v1/chat/completions"),
                *([] if args.no_control else [Target("a2", "127.0.0.1", llama_port, "/v1/chat/completions")]),
                target_from_url("b", a_api, "/v1/chat/completions"),
                target_from_url("c", b_api, "/v1/chat/completions"),
            ]
            upstream = llama_port
            for _ in range(args.relays):
                relay = subprocess.Popen(
                    [sys.executable, "-c", RELAY_SCRIPT, str(upstream)],
                    stdout=subprocess.PIPE,
                    start_new_session=True,
                )
                relays.append(relay)
                assert relay.stdout is not None
                upstream = int(relay.stdout.readline())
            if relays:
                LABELS["d"] = f"{len(relays)} plain TCP relay process{'es' if len(relays) > 1 else ''}"
                targets.append(Target("d", "127.0.0.1", upstream, "/v1/chat/completions"))
            meter = CpuMeter()
            assert a.proc is not None and b.proc is not None
            meter.add("node A", a.proc.pid)
            meter.add("node B", b.proc.pid)
            meter.add("llama", int(ready["pid"]))
            for n, relay in enumerate(relays, 1):
                meter.add(f"relay {n}", relay.pid)

            rng = random.Random(args.seed)
            print(
                f"prompt {PROMPT!r}, max_tokens {args.max_tokens}, temperature 0, "
                f"{args.warmup} warm-up + {args.rounds} measured rounds, random order per round, "
                f"llama threads: {args.llama_threads or 'default'}, extra llama-server args: {args.llama_args or 'none'}, "
                f"gap before each request: {args.gap_ms:g} ms"
            )
            disturbed: set[int] = set()
            for r in range(args.warmup + args.rounds):
                others = other_benchmarks()
                if others:
                    disturbed.add(r)
                    print(f"WARNING: other runs on this machine: {others}", flush=True)
                order = list(targets)
                rng.shuffle(order)
                for t in order:
                    if args.gap_ms:
                        time.sleep(args.gap_ms / 1e3)  # pacing: the last answer's tail work is over
                    sample = measured(meter, t, args.max_tokens)
                    if r >= args.warmup:
                        t.samples.append(sample)
                if r >= args.warmup:
                    line = "  ".join(
                        f"{t.key}: {t.samples[-1].ttft_s * 1e3:6.1f}ms {t.samples[-1].tokens_per_s:6.1f}t/s"
                        for t in targets
                    )
                    other = sum(t.samples[-1].cpu_ms["other"] for t in targets)
                    wall = sum(t.samples[-1].total_s * 1e3 for t in targets)
                    print(
                        f"round {r - args.warmup + 1:>3}: {line}  other CPU {other / wall:4.0%}", flush=True
                    )
            if other_benchmarks():
                disturbed.add(args.warmup + args.rounds)
            report(targets, args.rounds)
            print()
            served = args.warmup + args.rounds  # (b) and (c) requests each, every line written at its end
            wait_until(
                lambda: len(a.events("gateway.served")) >= served and len(b.events("gateway.served")) >= served,
                timeout=10,
                what="the nodes' access-log lines",
            )
            stages(targets, a.records(), b.records())
            print()
            summary(targets)
            if args.samples_out:
                save_samples(args.samples_out, targets)
            print(f"  tunnel transport for (c): {tunnel_transport(int(a.started['quic_port']))}")
            if disturbed:
                print("WARNING: other benchmark/test runs overlapped this one: the figures are not clean")
        finally:
            for p in factory.procs:
                notable = [r for r in p.records() if r.get("level") in ("warning", "error", "critical")]
                for rec in notable[-10:]:
                    print(f"log {p.config.stem}: {json.dumps(rec)[:300]}")
            for relay in relays:
                relay.kill()
                relay.wait(10)
            factory.close()


if __name__ == "__main__":
    main()
