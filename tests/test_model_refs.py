"""Model references, file choice by quantisation and shards, and the fit rules: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.models.files import FileChoiceError, files_for_name, files_for_quant, quants_in, shard_set
from meshllm.models.fit import allocate, download_fit, model_need
from meshllm.models.refs import BadReference, CatalogRef, HubRef, LocalRef, model_stem, parse_reference
from meshllm.placement import SOLO_HEADROOM

# -- references -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smollm2-135m", CatalogRef("smollm2-135m")),
        ("org/repo:model.Q4_K_M.gguf", HubRef("org/repo", filename="model.Q4_K_M.gguf")),
        ("org/repo:sub/dir/m.gguf", HubRef("org/repo", filename="sub/dir/m.gguf")),
        ("org/repo:q4_k_m", HubRef("org/repo", quant="Q4_K_M")),
        ("org/repo:IQ4_XS", HubRef("org/repo", quant="IQ4_XS")),
        ("org/repo@v1.0:F16", HubRef("org/repo", quant="F16", revision="v1.0")),
        ("hf://org/repo/m.gguf", HubRef("org/repo", filename="m.gguf")),
        ("hf://org/repo/a/b.gguf", HubRef("org/repo", filename="a/b.gguf")),
        (
            "https://huggingface.co/org/repo/resolve/main/m-Q8_0.gguf",
            HubRef("org/repo", filename="m-Q8_0.gguf"),
        ),
        (
            "https://hub.example/org/repo/resolve/abc123/x.gguf",
            HubRef("org/repo", filename="x.gguf", revision="abc123"),
        ),
        ("./models/tiny.gguf", LocalRef("./models/tiny.gguf")),
        ("/abs/model.gguf", LocalRef("/abs/model.gguf")),
        ("models/tiny.gguf", LocalRef("models/tiny.gguf")),
    ],
)
def test_parse_reference(text: str, expected: object) -> None:
    assert parse_reference(text, {"smollm2-135m"}) == expected


@pytest.mark.parametrize(
    "text",
    [
        "org/repo:README.md",
        "org/repo:notaquant",
        "hf://org/repo",
        "hf://org//x.gguf",
        "https://huggingface.co/org/repo/blob/main/x.gguf",
        "org/repo:../../etc/x.gguf",
    ],
)
def test_bad_hub_references_are_errors(text: str) -> None:
    with pytest.raises(BadReference):
        parse_reference(text)


def test_mesh_names() -> None:
    assert HubRef("org/repo", filename="dir/Model-Q4_K_M.gguf").name == "Model-Q4_K_M"
    assert HubRef("org/repo", filename="Big-Q4_K_M-00001-of-00003.gguf").name == "Big-Q4_K_M"
    assert (
        HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF", quant="Q4_K_M").name == "Llama-3.2-1B-Instruct-Q4_K_M"
    )
    assert model_stem("a.gguf") == "a"


# -- file choice ------------------------------------------------------------------------------------------

LISTING = [
    "README.md",
    "Model-IQ4_XS.gguf",
    "Model-Q4_K_M.gguf",
    "Model-Q4_K_M_L.gguf",
    "Model-Q8_0.gguf",
    "mmproj-Model-Q8_0.gguf",
    "Q6_K/Model-Q6_K-00001-of-00003.gguf",
    "Q6_K/Model-Q6_K-00002-of-00003.gguf",
    "Q6_K/Model-Q6_K-00003-of-00003.gguf",
    "Model-F16-00001-of-00002.gguf",
]


def test_quant_picks_exactly_its_file() -> None:
    assert files_for_quant(LISTING, "Q4_K_M") == ("Model-Q4_K_M.gguf",)
    assert files_for_quant(LISTING, "q8_0") == ("Model-Q8_0.gguf",)  # not the mmproj file
    assert files_for_quant(LISTING, "IQ4_XS") == ("Model-IQ4_XS.gguf",)


def test_quant_takes_every_shard_in_order() -> None:
    assert files_for_quant(LISTING, "Q6_K") == tuple(
        f"Q6_K/Model-Q6_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    )


def test_missing_shards_are_an_error() -> None:
    with pytest.raises(FileChoiceError, match="missing 1 of 2 shards"):
        files_for_quant(LISTING, "F16")


def test_unknown_quant_lists_what_exists() -> None:
    with pytest.raises(FileChoiceError, match=r"no Q2_K file .*Q4_K_M.*Q8_0"):
        files_for_quant(LISTING, "Q2_K")


def test_ambiguous_quant_is_an_error() -> None:
    with pytest.raises(FileChoiceError, match="more than one"):
        files_for_quant(["a-Q4_0.gguf", "b-Q4_0.gguf"], "Q4_0")


def test_named_file_brings_its_shards() -> None:
    assert files_for_name(LISTING, "Q6_K/Model-Q6_K-00002-of-00003.gguf")[0].endswith("00001-of-00003.gguf")
    assert files_for_name(LISTING, "Model-Q8_0.gguf") == ("Model-Q8_0.gguf",)
    with pytest.raises(FileChoiceError):
        files_for_name(LISTING, "nope.gguf")
    assert "Q4_K_M" in quants_in(LISTING)


@given(st.integers(1, 40), st.permutations(range(40)))
def test_shard_sets_are_complete_and_ordered(count: int, order: list[int]) -> None:
    names = [f"m-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    listing = [names[i] for i in order if i < count]
    for name in names:
        assert shard_set(listing, name) == tuple(names)


# -- fit --------------------------------------------------------------------------------------------------

sizes = st.integers(0, 1 << 42)


@given(sizes, sizes)
def test_need_is_weights_and_cache_with_headroom(weights: int, kv: int) -> None:
    need = model_need(weights, kv)
    assert need == int((weights + kv) * SOLO_HEADROOM)
    assert model_need(weights + 1, kv) >= need


@given(sizes, sizes, st.lists(sizes, max_size=5))
def test_download_fit(need: int, free: int, peers: list[int]) -> None:
    d = download_fit(need, free, peers)
    if need <= free:
        assert d.fetch and d.how == "solo"
    elif peers and free + sum(peers) >= need:
        assert d.fetch and d.how == "split"
    else:
        assert not d.fetch and d.how == "refused"
        assert d.available_bytes < need or not peers
        assert str(need) in d.reason
    assert d.needed_bytes == need


@given(st.lists(st.tuples(st.text(min_size=1, max_size=5), sizes), max_size=8), sizes)
def test_allocate_never_overcommits(needs: list[tuple[str, int]], capacity: int) -> None:
    out = allocate(needs, capacity)
    assert [a.name for a in out] == [n for n, _ in needs]
    assert sum(a.need for a in out if a.fits) <= capacity
    free = capacity
    for a in out:
        assert a.free_before == free
        assert a.fits == (a.need <= free)  # priority order: each takes from what is left
        free -= a.need if a.fits else 0


def test_two_models_that_fit_alone_do_not_fit_together() -> None:
    out = allocate([("a", 60), ("b", 60)], 100)
    assert [a.fits for a in out] == [True, False]
    assert allocate([("a", 60), ("b", 60), ("c", 30)], 100)[2].fits  # a smaller one still fits
