"""A tiny random-weight llama GGUF, written on the fly, for tests against the real ``llama-server``.

Tests that exercise the real llama.cpp binaries need a model file, but downloading even the smallest
published GGUF is slow, needs the network and makes CI flaky.  This module writes a few hundred KB
llama-architecture model with random weights instead: ``llama-server`` loads it in well under a second
and answers completions and chat completions (the text is gibberish, which is all a test needs).

Properties the tests can rely on:

* The tokenizer is GPT-2 style byte-level BPE: every byte is a token (so any prompt tokenizes), plus a
  handful of merges and three control tokens (``<|endoftext|>`` = BOS, ``<|im_start|>``,
  ``<|im_end|>`` = EOS).  ``tokenizer.chat_template`` is a plain ChatML Jinja template.
* The weights are arranged so the model only ever generates printable-ASCII tokens and never an
  end-of-generation token: generated text is valid UTF-8, never empty, and a generation always runs to
  ``max_tokens`` (or the context end), so ``finish_reason`` is ``"length"`` unless a stop string hits.
* Training context is 4096 (what meshllm passes as ``-c``), so llama-server does not cap the slot context.
* The file is a pure function of ``(seed, n_layer, n_ff)``.

Importing this module has no side effects; nothing is written until a function is called.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX_TRAIN = (
    4096  # = meshllm.serving.llama.SERVER_DEFAULT_ARGS -c; a smaller value makes llama-server cap the slot context
)
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Byte-pair merges (in GPT-2's byte-to-unicode alphabet, where "Ġ" is a space), applied in order.
_MERGES = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("Ġ", "s"),
    ("h", "i"),
    ("Ġ", "w"),
    ("o", "u"),
    ("l", "l"),
    ("Ġ", "h"),
    ("Ġh", "i"),
]

# The residual-stream dimension held at a constant positive value (see _tensors).
_GATE_DIM = 0
_SUPPRESS = -100.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what llama.cpp expects)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _vocab() -> tuple[list[str], list[int], list[str], list[bool]]:
    """Tokens, token types, merges, and for each token whether the model may generate it."""
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    allowed = [0x20 <= b <= 0x7E for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    merges: list[str] = []
    for left, right in _MERGES:
        merged = left + right
        assert left in tokens and right in tokens and merged not in tokens, (left, right)
        merges.append(f"{left} {right}")
        tokens.append(merged)
        types.append(int(gguf.TokenType.NORMAL))
        allowed.append(True)
    for special in (BOS_TOKEN, IM_START, EOS_TOKEN):
        tokens.append(special)
        types.append(int(gguf.TokenType.CONTROL))
        allowed.append(False)
    return tokens, types, merges, allowed


def _tensors(
    rng: np.random.Generator, n_vocab: int, n_layer: int, allowed: list[bool], n_ff: int = N_FF
) -> dict[str, np.ndarray]:
    """All tensors llama.cpp's llama loader wants, as numpy arrays (numpy shape = reversed ggml shape).

    Residual dimension ``_GATE_DIM`` is 1.0 in every token embedding and no layer writes to it (the
    matching rows of ``attn_output`` and ``ffn_down`` are zero), so after the final RMS norm it is
    always positive.  Output rows of tokens the model must not generate get a large negative weight
    on that dimension, which pushes their logits far below every other token's.
    """
    head_dim = N_EMBD // N_HEAD

    def w(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = w(n_vocab, N_EMBD, scale=1.0)
    embd[:, _GATE_DIM] = 1.0
    out = w(n_vocab, N_EMBD, scale=1.0)
    out[:, _GATE_DIM] = [0.0 if ok else _SUPPRESS for ok in allowed]

    proj = 1.0 / np.sqrt(N_EMBD)
    t: dict[str, np.ndarray] = {
        "token_embd.weight": embd,
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
        "output.weight": out,
    }
    for i in range(n_layer):
        attn_out = w(N_EMBD, N_HEAD * head_dim, scale=proj)
        ffn_down = w(N_EMBD, n_ff, scale=1.0 / np.sqrt(n_ff))
        attn_out[_GATE_DIM, :] = 0.0
        ffn_down[_GATE_DIM, :] = 0.0
        t |= {
            f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.attn_q.weight": w(N_HEAD * head_dim, N_EMBD, scale=proj),
            f"blk.{i}.attn_k.weight": w(N_HEAD_KV * head_dim, N_EMBD, scale=proj),
            f"blk.{i}.attn_v.weight": w(N_HEAD_KV * head_dim, N_EMBD, scale=proj),
            f"blk.{i}.attn_output.weight": attn_out,
            f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": w(n_ff, N_EMBD, scale=proj),
            f"blk.{i}.ffn_up.weight": w(n_ff, N_EMBD, scale=proj),
            f"blk.{i}.ffn_down.weight": ffn_down,
        }
    return t


def write_tiny_model(path: Path, seed: int = 0, n_layer: int = 2, n_ff: int = N_FF) -> Path:
    """Write a random-weight llama GGUF to ``path`` (overwriting it) and return ``path``.

    ``n_ff`` widens the feed-forward tensors (each ``n_ff * N_EMBD`` float32s): 41,000 and more puts
    every layer's three over llama.cpp's 10 MiB RPC cache threshold, as a real model's are."""
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    path = Path(path)
    tokens, types, merges, allowed = _vocab()
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"meshllm-tiny-llama-{n_layer}l-s{seed}" + (f"-ff{n_ff}" if n_ff != N_FF else ""))
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(BOS_TOKEN))
    writer.add_eos_token_id(tokens.index(EOS_TOKEN))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    for name, array in _tensors(rng, len(tokens), n_layer, allowed, n_ff).items():
        writer.add_tensor(name, array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(cache_dir: Path, seed: int = 0, n_layer: int = 2, n_ff: int = N_FF) -> Path:
    """Return the tiny model in ``cache_dir``, writing it first (atomically) if it is not there yet."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wide = f"-ff{n_ff}" if n_ff != N_FF else ""
    final = cache_dir / f"tiny-llama-{n_layer}l-s{seed}{wide}.gguf"
    if final.is_file():
        return final
    fd, tmp_name = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_tiny_model(tmp, seed=seed, n_layer=n_layer, n_ff=n_ff)
        tmp.chmod(0o644)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
