"""Tensor split across node processes with the real binaries: forced split, solo when it fits,
split-group liveness (host or worker killed), and waiting until the group has enough VRAM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from meshllm.models.gguf_shape import shape_of_file
from tests.support import NodeProcess, ProcessFactory, console_status, wait_until
from tests.support import model_status as support_model_status

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def layered_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import tiny_model

    folder = tmp_path_factory.mktemp("split-models")
    return tiny_model(folder, n_layer=4).rename(folder / "tiny4.gguf")


BIG = "vram_gb = 2.0"  # the host: most VRAM wins the election
SMALL = "vram_gb = 1.0"


def serve(model: Path | str, force: bool = False) -> str:
    return f'[models]\nserve = ["{model}"]\nforce_split = {"true" if force else "false"}\n'


def status(proc: NodeProcess) -> dict[str, Any]:
    return console_status(proc.console_url)


def model_status(proc: NodeProcess, name: str) -> dict[str, Any]:
    return support_model_status(proc.console_url, name)


def complete(proc: NodeProcess, model: str, prompt: str = "Once upon a time", tokens: int = 12) -> str:
    c = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=60)
    return c.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0).choices[0].text


def wait_split(host: NodeProcess, model: str, workers: set[str], timeout: float = 60) -> dict[str, Any]:
    def split() -> dict[str, Any] | None:
        m = model_status(host, model)
        return m if m.get("state") == "split" and set(m["workers"]) == workers else None

    return wait_until(split, timeout, what=f"{model} split over {workers}")


def rpc_starts(proc: NodeProcess) -> list[dict[str, Any]]:
    return proc.events("llama.starting", kind="rpc-server")


def test_forced_split_serves_through_both_nodes_and_survives_host_death(
    procs: ProcessFactory, layered_gguf: Path
) -> None:
    a = procs.start("a", extra=serve(layered_gguf, force=True), node_extra=BIG)
    b = procs.start("b", join=(a.token,), extra=serve(layered_gguf), node_extra=SMALL)
    model = wait_split(a, "tiny4", {b.node_id})
    assert model["host"] == a.node_id and model["fractions"] == [0.667, 0.333]
    assert b.events("llama.ready", kind="rpc-server"), "the worker runs an rpc-server"
    (backend,) = a.events("llama.backend")  # the device list capacity detection read, logged once
    assert (backend["backend"], backend["devices"], backend["variant"]) == ("cpu", [], "cpu")
    server = a.events("llama.starting", kind="llama-server")[-1]
    assert "--rpc" in server["cmd"] and "--tensor-split 0.667,0.333" in server["cmd"]
    text = complete(a, "tiny4")
    assert text and complete(b, "tiny4") == text  # b has no llama-server of its own: tunnelled to a

    mark = len(b.records())
    a.kill9()
    # The events, not their speed: tests/bench/bench_split.py measures host kill -9 -> these.
    b.wait_event("peer.died", timeout=20, since=mark, peer=a.node_id)
    b.wait_event("llama.stopped", timeout=20, since=mark, key="rpc:tiny4")
    # The worker is now the only node of the model: it takes over and serves it itself.
    wait_until(lambda: model_status(b, "tiny4").get("state") == "solo", timeout=30, what="b to take over")
    assert complete(b, "tiny4") == text


def test_worker_death_makes_host_replan(procs: ProcessFactory, layered_gguf: Path) -> None:
    a = procs.start("a", extra=serve(layered_gguf, force=True), node_extra=BIG)
    b = procs.start("b", join=(a.token,), extra=serve(layered_gguf), node_extra=SMALL)
    wait_split(a, "tiny4", {b.node_id})
    text = complete(a, "tiny4")
    mark = len(a.records())
    b.kill9()
    a.wait_event("peer.died", timeout=20, since=mark, peer=b.node_id)
    a.wait_event("election.plan", timeout=20, since=mark, mode="solo")
    wait_until(lambda: model_status(a, "tiny4").get("state") == "solo", timeout=30, what="a to serve solo")
    assert complete(a, "tiny4") == text
    # The restart against a dead worker did not loop: since the kill, at most a couple of
    # llama-server starts, the last of them the solo server.
    starts = [
        r["cmd"]
        for r in a.records()[mark:]
        if r.get("event") == "llama.starting" and r.get("kind") == "llama-server"
    ]
    assert 1 <= len(starts) <= 3 and "--rpc" not in starts[-1], starts


def test_model_that_fits_is_never_split(procs: ProcessFactory, layered_gguf: Path) -> None:
    a = procs.start("a", extra=serve(layered_gguf))
    b = procs.start("b", join=(a.token,), extra=serve(layered_gguf))
    for p in (a, b):
        wait_until(lambda p=p: model_status(p, "tiny4").get("state") == "solo", timeout=30, what="solo")
    # b's own llama-server can be up before a has heard by gossip that b serves it
    both = {a.node_id, b.node_id}
    wait_until(lambda: set(model_status(a, "tiny4")["hosts"]) == both, timeout=15, what="a to list both hosts")
    assert complete(a, "tiny4") == complete(b, "tiny4")
    assert not rpc_starts(a) and not rpc_starts(b)


def test_three_small_nodes_wait_then_serve_together(procs: ProcessFactory, layered_gguf: Path) -> None:
    # What the model takes: its weights plus the KV cache of the 4096-token context it runs with.
    size = layered_gguf.stat().st_size + shape_of_file(layered_gguf).kv_cache_bytes(4096)
    # Each node offers 40% of that: two are not enough for 1.1x, three are.
    vram = f"vram_gb = {size * 0.4 / 1024**3:.9f}"
    a = procs.start("a", extra=serve(layered_gguf), node_extra=vram)
    b = procs.start("b", join=(a.token,), extra=serve(layered_gguf), node_extra=vram)
    wait_until(lambda: len(status(a)["peers"]) == 1, timeout=20, what="b to join")
    waiting = a.wait_event("election.waiting", timeout=10)
    assert waiting["needed_bytes"] > waiting["available_bytes"]
    wait_until(
        lambda: model_status(a, "tiny4").get("available_bytes", 0) >= 2 * int(size * 0.4) - 8,
        timeout=10,
        what="a to count b's VRAM",
    )
    assert model_status(a, "tiny4")["state"] == "waiting" and not rpc_starts(a) and not rpc_starts(b)
    c = procs.start("c", join=(a.token,), extra=serve(layered_gguf), node_extra=vram)
    host = min((a, b, c), key=lambda p: p.node_id)  # equal VRAM: the lowest node id hosts
    workers = {p.node_id for p in (a, b, c)} - {host.node_id}
    wait_split(host, "tiny4", workers)
    assert complete(a, "tiny4")


def test_smollm2_split_gives_the_same_text_as_solo(procs: ProcessFactory) -> None:
    solo = procs.start("solo", extra=serve("smollm2-135m"))
    a = procs.start("a", extra=serve("smollm2-135m", force=True), node_extra=BIG)
    b = procs.start("b", join=(a.token,), extra=serve("smollm2-135m"), node_extra=BIG)
    host = min((a, b), key=lambda p: p.node_id)  # equal VRAM: split 1:1, the lower node id hosts
    wait_until(lambda: model_status(solo, "smollm2-135m").get("state") == "solo", timeout=60, what="solo")
    worker = b if host is a else a
    model = wait_split(host, "smollm2-135m", {worker.node_id}, timeout=120)
    assert model["fractions"] == [0.5, 0.5]
    # The host says "split" as soon as its llama-server is up; a learns that from its next gossip.
    wait_until(lambda: model_status(a, "smollm2-135m").get("hosts"), timeout=30, what="a to know the host")
    prompt = "The capital of France is"
    assert complete(a, "smollm2-135m", prompt, 16) == complete(solo, "smollm2-135m", prompt, 16)


def test_split_falls_back_to_quic_tunnels(procs: ProcessFactory, layered_gguf: Path) -> None:
    # The host cannot use the TLS fast path: its RPC tunnels go over QUIC streams instead.
    a = procs.start(
        "a", extra=serve(layered_gguf, force=True), node_extra=BIG, env={"MESHLLM_FAST_PATH": "0"}
    )
    b = procs.start("b", join=(a.token,), extra=serve(layered_gguf), node_extra=SMALL)
    wait_split(a, "tiny4", {b.node_id})
    assert a.events("rpc.fast_path_fallback")
    assert complete(a, "tiny4") and complete(b, "tiny4") == complete(a, "tiny4")
    assert status(a)["rpc_bytes"]["to_workers"] > 0


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers whose three feed-forward tensors are 11 MiB each: over llama.cpp's 10 MiB threshold,
    as a real model's are (SmolLM2's only such tensor stays on the host)."""
    from tests.tinymodel import tiny_model

    folder = tmp_path_factory.mktemp("wide-models")
    return tiny_model(folder, n_layer=4, n_ff=45056).rename(folder / "wide4.gguf")


def worker_load_bytes(procs: ProcessFactory, model: Path, tag: str, tensor_cache: bool) -> int:
    """Bytes the host sent to the worker's rpc-server while loading a forced split (no request yet).

    Equal VRAM: a 1:1 split, so the worker holds a whole layer (llama.cpp puts layer i on the device
    whose share covers i / (layers + 1): with 4 layers and 2:1 the worker would hold the output only)."""
    cache = f"[llama]\ntensor_cache = {'true' if tensor_cache else 'false'}\n"
    a = procs.start(f"{tag}a", extra=serve(model, force=True) + cache, node_extra=BIG)
    b = procs.start(f"{tag}b", join=(a.token,), extra=serve(model, force=True) + cache, node_extra=BIG)
    host, worker = (a, b) if a.node_id < b.node_id else (b, a)  # equal VRAM: the lower node id hosts
    wait_split(host, "wide4", {worker.node_id}, timeout=120)
    rpc_server = worker.events("llama.starting", kind="rpc-server")[-1]["cmd"].split()
    if tensor_cache:
        filled = worker.events("rpc.cache_filled", model="wide4")
        assert filled and filled[0]["files"] == 12, "every tensor over 10 MiB written to the worker's cache"
        assert "-c" in rpc_server
    else:
        assert not worker.events("rpc.cache_filled") and "-c" not in rpc_server
    assert "-c" not in host.events("llama.starting", kind="rpc-server")[-1]["cmd"].split()
    got = int(status(worker)["rpc_bytes"]["served_in"])
    assert complete(host, "wide4"), "the split serves"
    a.stop()
    b.stop()
    return got


def test_a_worker_with_the_file_gets_hashes_not_weights(procs: ProcessFactory, wide_gguf: Path) -> None:
    """The worker's rpc-server, its tensor cache filled from its own GGUF, receives under 5 % of the
    bytes it receives without the cache: the host sends a hash for each tensor over 10 MiB."""
    cold = worker_load_bytes(procs, wide_gguf, "cold", tensor_cache=False)
    warm = worker_load_bytes(procs, wide_gguf, "warm", tensor_cache=True)
    print(f"host -> worker bytes during the load: without the cache {cold}, with it {warm}")
    assert cold > 3 * 11 * 2**20, "without the cache the worker's layer crosses: three 11 MiB tensors"
    assert warm < 0.05 * cold
