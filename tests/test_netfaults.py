"""The network fails, not the process: partitions, one-way loss, loss with delay between node processes
in their own network namespaces (tests/netns.py). Each side of a cut declares the other dead, keeps
serving what it has, and after the heal the mesh is one again, with no ghost peer and no flapping: every
peer's state changes are counted from the nodes' own logs.

Timings are printed, not asserted beyond generous bounds (tests/bench/ has the figures' benchmarks).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.netns import NamespacedNodeProcess, NetLab, available
from tests.support import console_status, model_status, wait_until

pytestmark = [pytest.mark.llama, pytest.mark.slow, pytest.mark.serial]

MODEL = "tiny"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetLab]:
    if (why := available()) is not None:  # the test command runs as root and installs iptables
        pytest.fail(f"network namespaces unavailable: {why}")
    lab = NetLab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def serve(model: Path) -> str:
    return f'[models]\nserve = ["{model}"]\n'


def epoch(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def peers_of(proc: NamespacedNodeProcess) -> set[str]:
    return {p["node_id"] for p in console_status(proc.console_url)["peers"]}


def one_mesh(procs: list[NamespacedNodeProcess]) -> bool:
    ids = {p.node_id for p in procs}
    return all(peers_of(p) == ids - {p.node_id} and not console_status(p.console_url)["dead"] for p in procs)


def answers(proc: NamespacedNodeProcess) -> bool:
    client = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=10)
    try:
        out = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0)
    except openai.APIError:
        return False
    return bool(out.choices[0].text)


def state_changes(proc: NamespacedNodeProcess) -> Counter[tuple[str, str]]:
    """(event, peer) -> how often this node logged it: joins, deaths and departures."""
    return Counter(
        (r["event"], r["peer"])
        for r in proc.records()
        if r.get("event") in ("peer.joined", "peer.died", "peer.left") and "peer" in r
    )


def four_nodes(lab: NetLab, tiny_gguf: Path) -> list[NamespacedNodeProcess]:
    """a and c serve the tiny model; b and d serve nothing (they tunnel to a host)."""
    a = lab.start("a", extra=serve(tiny_gguf))
    b = lab.start("b", join=(a.token,))
    c = lab.start("c", join=(a.token,), extra=serve(tiny_gguf))
    d = lab.start("d", join=(a.token,))
    nodes = [a, b, c, d]
    wait_until(lambda: one_mesh(nodes), 60, what="one mesh of four")
    wait_until(
        lambda: all(set(model_status(p.console_url, MODEL).get("hosts", [])) == {a.node_id, c.node_id} for p in nodes),
        90,
        what="a and c hosting, as every node sees it",
    )
    return nodes


def test_a_two_two_partition_serves_on_both_sides_and_heals_into_one_mesh(
    lab: NetLab, tiny_gguf: Path
) -> None:
    a, b, c, d = nodes = four_nodes(lab, tiny_gguf)
    before = {p.node_id: state_changes(p) for p in nodes}

    cut_at = time.time()
    lab.partition(("a", "b"), ("c", "d"))
    detect = []
    for side, other in (((a, b), (c, d)), ((c, d), (a, b))):
        for x in side:
            for y in other:
                died = x.wait_event("peer.died", 15, peer=y.node_id)
                detect.append(epoch(died) - cut_at)
    print(f"partition 2+2: every cross pair declared dead in {min(detect):.2f}-{max(detect):.2f} s")
    # Each side keeps serving from the host it still has, and no node took on a host it does not need.
    for proc, host in ((b, a), (d, c)):
        wait_until(lambda proc=proc: answers(proc), 30, what=f"{proc.host.name} to answer through its side's host")
        assert model_status(proc.console_url, MODEL).get("hosts") == [host.node_id]

    healed_at = time.time()
    lab.heal()
    wait_until(lambda: one_mesh(nodes), 30, what="one mesh again after the heal")
    print(f"heal: one mesh again (every node sees the other three, none dead) in {time.time() - healed_at:.2f} s")
    for proc in nodes:
        assert set(model_status(proc.console_url, MODEL).get("hosts", [])) == {a.node_id, c.node_id}
        assert answers(proc)

    # No flapping: across the cut, exactly one death and one join again per pair; nothing within a side.
    same_side = {a.node_id: b.node_id, b.node_id: a.node_id, c.node_id: d.node_id, d.node_id: c.node_id}
    for proc in nodes:
        changes = state_changes(proc) - before[proc.node_id]
        for other in nodes:
            if other is proc:
                continue
            expected = 0 if same_side[proc.node_id] == other.node_id else 1
            seen = (changes[("peer.died", other.node_id)], changes[("peer.joined", other.node_id)])
            assert seen == (expected, expected), f"{proc.host.name} about {other.host.name}: {seen}"
            assert changes[("peer.left", other.node_id)] == 0


def test_one_way_loss_leaves_no_node_half_alive(lab: NetLab, tiny_gguf: Path) -> None:
    """a stops hearing b while b still hears a: probes are answered both ways or not at all, so both
    declare the other dead (neither keeps a peer that cannot answer), then both take it back."""
    a, b, c, d = nodes = four_nodes(lab, tiny_gguf)
    before = {p.node_id: state_changes(p) for p in nodes}
    lab.drop_from("a", "b")
    a.wait_event("peer.died", 15, peer=b.node_id)
    b.wait_event("peer.died", 15, peer=a.node_id)
    # c and d still hear both: they keep both, and the deaths a and b saw do not spread to them.
    for proc in (c, d):
        assert {a.node_id, b.node_id} <= peers_of(proc)
    assert answers(b), "b still answers: through c, the host it can reach"
    lab.heal()
    wait_until(lambda: one_mesh(nodes), 30, what="one mesh again after the heal")
    for proc in nodes:
        changes = state_changes(proc) - before[proc.node_id]
        deaths = sum(n for (event, _), n in changes.items() if event == "peer.died")
        expected = 1 if proc in (a, b) else 0
        assert deaths == expected, f"{proc.host.name}: {changes}"


RTT_SCRIPT = """
import socket, statistics, sys, time
ip, n = sys.argv[1], int(sys.argv[2])
took = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    t0 = time.perf_counter()
    try:
        s.connect((ip, 9))  # nothing listens: the RST answering the SYN ends one round trip
    except ConnectionRefusedError:
        took.append(time.perf_counter() - t0)
    finally:
        s.close()
print(statistics.median(took) * 1000)
"""


def rtt_ms(lab: NetLab, src: str, dst_ip: str, n: int = 15) -> float:
    """Median round trip from ``src``'s namespace (the root namespace for "") to ``dst_ip``: the time a
    TCP connect to a closed port takes to be refused (SYN out, RST back)."""
    prefix = ("ip", "netns", "exec", lab.hosts[src].netns) if src else ()
    done = subprocess.run(
        [*prefix, sys.executable, "-c", RTT_SCRIPT, dst_ip, str(n)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_delay_adds_its_time_to_each_delayed_direction_and_heal_removes_it(lab: NetLab) -> None:
    lab.host("a")
    b = lab.host("b")
    base = rtt_ms(lab, "a", b.ip)
    lab.delay("b", 50)  # a -> b delayed
    one_way = rtt_ms(lab, "a", b.ip)
    from_bridge = rtt_ms(lab, "", b.ip)  # the test's own traffic is never delayed
    lab.delay("a", 50)  # and b -> a
    both_ways = rtt_ms(lab, "a", b.ip)
    lab.heal()
    healed = rtt_ms(lab, "a", b.ip)
    print(
        f"RTT a->b: {base:.2f} ms, b delayed 50 ms {one_way:.2f} ms, both {both_ways:.2f} ms, "
        f"healed {healed:.2f} ms; bridge->b with b delayed {from_bridge:.2f} ms; counts {lab.delay_counts}"
    )
    assert base < 20
    assert 50 <= one_way - base < 90, one_way  # the upper bounds leave room for a loaded machine
    assert 100 <= both_ways - base < 170, both_ways
    assert from_bridge < 20
    assert healed < 20
    assert lab.delayers == {}
    assert lab.delay_counts["a"]["packets"] > 0 and lab.delay_counts["b"]["packets"] > 0
    assert lab.delay_counts["b"].get("dropped", 0) == 0, lab.delay_counts


def stream_tokens(proc: NamespacedNodeProcess, model: str, tokens: int = 16) -> int:
    """Tokens of one streamed completion through ``proc``'s API (0 when it failed or was cut)."""
    client = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=30)
    got = 0
    try:
        stream = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=tokens, temperature=0, stream=True
        )
        for chunk in stream:
            got += sum(1 for c in chunk.choices if c.text)
    except openai.APIError:
        return 0
    return got


def split_mesh(lab: NetLab, model: Path) -> list[NamespacedNodeProcess]:
    """a hosts ``model`` split with b as its worker; c serves nothing and asks through a."""
    a = lab.start("a", extra=f'[models]\nserve = ["{model}"]\nforce_split = true\n', node_extra="vram_gb = 2.0")
    b = lab.start("b", join=(a.token,), extra=f'[models]\nserve = ["{model}"]\n', node_extra="vram_gb = 1.0")
    c = lab.start("c", join=(a.token,))
    nodes = [a, b, c]
    wait_until(lambda: one_mesh(nodes), 60, what="one mesh of three")
    name = model.stem

    def split() -> bool:
        m = model_status(a.console_url, name)
        return m.get("state") == "split" and m.get("workers") == [b.node_id]

    wait_until(split, 90, what=f"{name} split over a and b")
    wait_until(lambda: stream_tokens(c, name) > 0, 60, what="c to get tokens through the split")
    return nodes


def loss_run(lab: NetLab, nodes: list[NamespacedNodeProcess], model: str, seconds: float) -> dict[str, float]:
    """Streams from the last node for ``seconds``: requests, failures, tokens/s."""
    asker = nodes[-1]
    done = failed = tokens = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        got = stream_tokens(asker, model)
        done += 1
        failed += got == 0
        tokens += got
    elapsed = time.monotonic() - t0
    return {"requests": done, "failed": failed, "tokens_per_s": tokens / elapsed}


LOSS_SECONDS = 40.0  # the CI run; tests/bench/bench_netfaults.py runs it for 10 minutes


def test_ten_percent_loss_and_50_ms_delay_everywhere_no_false_death_and_split_still_serves(
    lab: NetLab, layered_gguf_for_faults: Path
) -> None:
    """Every node loses 10 % of what the others send it and gets the rest 50 ms late (so each link
    loses ~19 % of its round trips and takes 100 ms more for each)."""
    nodes = split_mesh(lab, layered_gguf_for_faults)
    name = layered_gguf_for_faults.stem
    clean = loss_run(lab, nodes, name, 10.0)
    marks = [len(p.records()) for p in nodes]
    for host in ("a", "b", "c"):
        lab.loss(host, 0.10)
        lab.delay(host, 50)
    lossy = loss_run(lab, nodes, name, LOSS_SECONDS)
    lab.heal()
    print(
        f"no loss: {clean}; 10 % loss and 50 ms delay on every link for {LOSS_SECONDS:g} s: {lossy}; "
        f"delayed: {lab.delay_counts}"
    )
    deaths = [r for p, mark in zip(nodes, marks, strict=True) for r in p.records()[mark:] if r.get("event") == "peer.died"]
    assert deaths == [], f"false deaths under loss and delay: {deaths}"
    assert lossy["failed"] == 0 and lossy["requests"] > 0, lossy
    assert all(lab.delay_counts[h]["packets"] > 0 for h in ("a", "b", "c")), lab.delay_counts


@pytest.fixture(scope="module")
def layered_gguf_for_faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import tiny_model

    folder = tmp_path_factory.mktemp("fault-models")
    return tiny_model(folder, n_layer=4).rename(folder / "tiny4.gguf")


class BusyLoops:
    """One busy loop per core (plus ``extra``), each its own process group, ended by PID."""

    def __init__(self, extra: int = 0) -> None:
        n = (os.cpu_count() or 1) + extra
        self.procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)
        ]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


CPU_SECONDS = 30.0  # the CI run; tests/bench/bench_netfaults.py runs it for 5 minutes


def test_saturated_cpus_no_false_death_and_requests_complete(lab: NetLab, layered_gguf_for_faults: Path) -> None:
    nodes = split_mesh(lab, layered_gguf_for_faults)
    marks = [len(p.records()) for p in nodes]
    busy = BusyLoops(extra=2)
    try:
        run = loss_run(lab, nodes, layered_gguf_for_faults.stem, CPU_SECONDS)
    finally:
        busy.close()
    print(f"{len(busy.procs)} busy loops on {os.cpu_count()} cores for {CPU_SECONDS:g} s: {run}")
    deaths = [r for p, mark in zip(nodes, marks, strict=True) for r in p.records()[mark:] if r.get("event") == "peer.died"]
    assert deaths == [], f"false deaths under CPU saturation: {deaths}"
    assert run["failed"] == 0 and run["requests"] > 0, run
