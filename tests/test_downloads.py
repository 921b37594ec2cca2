"""Hub models end to end, with real node processes, real llama.cpp and a fake hub: fetched and
served, refused before a byte of weights, resumed after kill -9, clear errors, offline from the
cache, and several models against one memory budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from meshllm.models.hub import PARTIAL
from meshllm.serving.gguf_layout import gguf_tensors
from tests.fake_hub import FakeHub
from tests.fake_hub import fake_hub as fake_hub_fixture  # noqa: F401
from tests.support import NodeProcess, ProcessFactory, console_status, model_status, wait_until
from tests.test_hub import smollm2

pytestmark = pytest.mark.llama

TINY_REPO = "org/tiny-GGUF"
TINY_FILE = "tiny-F32.gguf"


def models_toml(serve: list[str], cache: Path, context: int = 4096) -> str:
    return (
        f"[models]\nserve = {json.dumps(serve)}\ncache_dir = {json.dumps(str(cache))}\ncontext = {context}\n"
    )


def status(proc: NodeProcess) -> dict[str, Any]:
    return console_status(proc.console_url)


def model(proc: NodeProcess, name: str) -> dict[str, Any]:
    return model_status(proc.console_url, name)


def complete(proc: NodeProcess, name: str) -> str:
    c = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=60)
    return c.completions.create(model=name, prompt="Once", max_tokens=4, temperature=0).choices[0].text


def test_hub_model_is_fetched_then_served_and_used_offline_later(
    procs: ProcessFactory, fake_hub: FakeHub, tiny_gguf: Path, tmp_path: Path
) -> None:
    fake_hub.add_file(TINY_REPO, TINY_FILE, tiny_gguf)
    cache = tmp_path / "cache"
    a = procs.start("a", extra=models_toml([f"{TINY_REPO}:F32"], cache))
    a.wait_event("download.started", 30, model="tiny-F32")
    done = a.wait_event("download.done", 30, model="tiny-F32")
    assert Path(done["path"]).read_bytes() == tiny_gguf.read_bytes()
    a.wait_event("llama.ready", 60)
    assert complete(a, "tiny-F32")
    assert model(a, "tiny-F32")["download"]["state"] == "done"
    a.stop()
    # Offline, with the hub gone: the cache is enough.
    fake_hub.close()
    b = procs.start("b", extra=models_toml([f"{TINY_REPO}:F32"], cache), env={"HF_HUB_OFFLINE": "1"})
    b.wait_event("download.cached", 30, model="tiny-F32")
    b.wait_event("llama.ready", 60)
    assert complete(b, "tiny-F32")


def test_model_that_cannot_fit_is_refused_before_any_weight(
    procs: ProcessFactory, fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.add_file("org/SmolLM2-GGUF", "SmolLM2-Q4_1.gguf", smollm2())
    cache = tmp_path / "cache"
    a = procs.start("a", extra=models_toml(["org/SmolLM2-GGUF:Q4_1"], cache), node_extra="vram_gb = 0.05")
    refused = a.wait_event("download.refused", 30)
    assert refused["needed_bytes"] > refused["available_bytes"] == int(0.05 * 1024**3)
    assert "no peer" in refused["reason"]
    m = wait_until(
        lambda: model(a, "SmolLM2-Q4_1") if model(a, "SmolLM2-Q4_1").get("state") == "refused" else None,
        10,
        what="the refusal in status",
    )
    assert m["download"]["state"] == "refused" and "no peer" in m["detail"]
    first_weight = min(t.offset for t in gguf_tensors(smollm2()))
    assert fake_hub.body_bytes_served("org/SmolLM2-GGUF", "SmolLM2-Q4_1.gguf") <= first_weight
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing left on disk
    assert not a.events("download.started")


def test_download_resumes_after_kill9(procs: ProcessFactory, fake_hub: FakeHub, tmp_path: Path) -> None:
    repo, name = "org/SmolLM2-GGUF", "SmolLM2-Q4_1.gguf"
    size = fake_hub.add_file(repo, name, smollm2()).size
    cache = tmp_path / "cache"
    fake_hub.stall_after(size // 2)
    a = procs.start("a", extra=models_toml([f"{repo}:Q4_1"], cache))
    a.wait_event("download.started", 30)
    fake_hub.wait_for_bytes(repo, name, size // 2, timeout=60)
    partial = wait_until(lambda: next(iter(cache.rglob("*" + PARTIAL)), None), 10, what="the partial file")
    wait_until(lambda: partial.stat().st_size >= size // 4, 20, what="bytes on disk")
    a.kill9()
    fake_hub.release()
    kept = partial.stat().st_size
    served_before = fake_hub.body_bytes_served(repo, name)
    fake_hub.stall_after(None)
    b = procs.start("a")  # the same node again
    b.wait_event("download.done", 60)
    ranges = [r.range for r in fake_hub.requests_for("GET", name) if r.range and r.range.endswith("-")]
    assert ranges[-1] == f"bytes={kept}-"
    assert fake_hub.body_bytes_served(repo, name) - served_before <= size - kept + 1024 * 1024
    b.wait_event("llama.ready", 60)


def test_bad_references_are_clear_errors_and_the_node_keeps_serving(
    procs: ProcessFactory, fake_hub: FakeHub, tiny_gguf: Path, tmp_path: Path
) -> None:
    fake_hub.add_file("org/gated", "g-Q8_0.gguf", tiny_gguf, gated_token="secret")
    serve = ["org/missing:Q4_K_M", "org/gated:Q8_0", f"{tiny_gguf}"]
    a = procs.start("a", extra=models_toml(serve, tmp_path / "cache"))
    failures = {
        e["model"]: e["reason"] for e in [a.wait_event("download.failed", 30, model="missing-Q4_K_M")]
    }
    failures["gated-Q8_0"] = a.wait_event("download.failed", 30, model="gated-Q8_0")["reason"]
    assert (
        "org/missing:Q4_K_M" in failures["missing-Q4_K_M"] and "no repository" in failures["missing-Q4_K_M"]
    )
    assert "gated" in failures["gated-Q8_0"] and "HF_TOKEN" in failures["gated-Q8_0"]
    a.wait_event("llama.ready", 60)
    assert complete(a, "tiny")
    m = wait_until(
        lambda: model(a, "missing-Q4_K_M") if model(a, "missing-Q4_K_M").get("state") == "failed" else None,
        10,
        what="the failure in status",
    )
    assert "no repository" in m["detail"] and m["download"]["state"] == "failed"


def test_unreachable_hub_is_a_clear_error(procs: ProcessFactory, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    a = procs.start("a", extra=models_toml(["org/x:Q4_K_M"], tmp_path / "cache"), env=env)
    failed = a.wait_event("download.failed", 60)
    assert "cannot reach http://127.0.0.1:9" in failed["reason"]


def test_two_models_that_fit_alone_never_start_together(
    procs: ProcessFactory, two_tiny_models: tuple[Path, Path]
) -> None:
    a_path, b_path = two_tiny_models
    size = a_path.stat().st_size
    # Memory for one tiny model (weights + its 4096-token cache, x1.1) but not two.
    from meshllm.models.gguf_shape import shape_of_file

    need = int((size + shape_of_file(a_path).kv_cache_bytes(4096)) * 1.1)
    vram = f"vram_gb = {need * 1.5 / 1024**3:.9f}"
    serve = f'[models]\nserve = ["{a_path}", "{b_path}"]\n'
    a = procs.start("a", extra=serve, node_extra=vram)
    a.wait_event("llama.ready", 60)
    waiting = a.wait_event("election.waiting", 10, model="tiny-b")
    assert waiting["needed_bytes"] == need and waiting["available_bytes"] < need
    assert model(a, "tiny-a")["state"] == "solo" and model(a, "tiny-b")["state"] == "waiting"
    assert len(a.events("llama.starting")) == 1
    body = status(a)
    assert body["capacity_source"] == "config" and body["vram_bytes"] == int(need * 1.5)
    assert body["gpus"] == []  # no NVIDIA GPU here; on a GPU node each has index, uuid, total and free bytes


def test_refused_model_is_fetched_once_a_peer_makes_a_split_possible(
    procs: ProcessFactory, fake_hub: FakeHub, tmp_path: Path
) -> None:
    from meshllm.models.gguf_shape import shape_of_file
    from tests.tinymodel import tiny_model

    path = tiny_model(tmp_path, n_layer=4)
    fake_hub.add_file("org/tiny4-GGUF", "tiny4-F32.gguf", path)
    need = int((path.stat().st_size + shape_of_file(path).kv_cache_bytes(4096)) * 1.1)
    # Each node has 60% of what the model needs: alone it is refused, the two of them can split it.
    vram = f"vram_gb = {need * 0.6 / 1024**3:.9f}"
    serve = models_toml(["org/tiny4-GGUF:F32"], tmp_path / "cache-a")
    a = procs.start("a", extra=serve, node_extra=vram)
    a.wait_event("download.refused", 30, model="tiny4-F32")
    assert fake_hub.body_bytes_served("org/tiny4-GGUF", "tiny4-F32.gguf") < path.stat().st_size
    b = procs.start(
        "b", join=(a.token,), extra=models_toml(["org/tiny4-GGUF:F32"], tmp_path / "cache-b"), node_extra=vram
    )
    host = min((a, b), key=lambda p: p.node_id)  # equal memory: the lowest node id hosts
    host.wait_event("download.done", 60, model="tiny4-F32")
    wait_until(lambda: model(host, "tiny4-F32").get("state") == "split", 60, what="the split")
    assert complete(host, "tiny4-F32")
    worker = b if host is a else a
    assert not worker.events(
        "download.started"
    )  # a worker needs no file: its rpc-server gets tensors from the host


def test_split_gguf_shards_are_fetched_and_served_together(
    procs: ProcessFactory, fake_hub: FakeHub, tmp_path: Path
) -> None:
    import subprocess

    from meshllm.serving.llama import find_binaries
    from tests.tinymodel import tiny_model

    whole = tiny_model(tmp_path, n_layer=4)
    split = find_binaries(None).server.parent / "llama-gguf-split"
    out = tmp_path / "shards" / "tiny4-F32"
    out.parent.mkdir()
    subprocess.run(
        [str(split), "--split-max-tensors", "16", str(whole), str(out)], check=True, capture_output=True
    )
    shards = sorted(out.parent.glob("*.gguf"))
    assert len(shards) >= 2 and shards[0].name.endswith(f"-00001-of-{len(shards):05d}.gguf")
    for shard in shards:
        fake_hub.add_file("org/split-GGUF", f"F32/{shard.name}", shard)
    a = procs.start("a", extra=models_toml(["org/split-GGUF:F32"], tmp_path / "cache"))
    done = a.wait_event("download.done", 60, model="split-F32")
    assert Path(done["path"]).name == shards[0].name
    assert sorted(p.name for p in Path(done["path"]).parent.iterdir()) == [s.name for s in shards]
    a.wait_event("llama.ready", 60)
    assert complete(a, "split-F32")
