"""What a model needs besides its weights, read from the first bytes of its GGUF.

The fit check runs before any weight is fetched: a ranged request for the head of the file gives
the metadata, and from it the KV cache a context of N tokens takes (layers x KV heads x key and
value length x N x 2 bytes for llama.cpp's default f16 cache). The reader stops as soon as it has
what it needs, and says how many bytes it wants when the head it got is too short (tokenizer
arrays come later in most files, but not in all).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.serving.gguf_layout import GGUFError

KV_BYTES_PER_ELEMENT = 2  # f16, llama.cpp's default --cache-type-k/v

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALAR = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_STRING, _ARRAY = 8, 9


class NeedMoreBytes(GGUFError):
    """The head of the file ended before the metadata the caller needs."""

    def __init__(self, have: int) -> None:
        super().__init__(f"GGUF metadata continues past the first {have} bytes")
        self.have = have


@dataclass(frozen=True)
class ModelShape:
    """The parts of a model's metadata that size its KV cache."""

    architecture: str
    layers: int
    kv_heads: int
    key_length: int
    value_length: int
    context_length: int

    def kv_cache_bytes(self, context: int) -> int:
        """Bytes of K and V cache for ``context`` tokens (0: the model's own context length)."""
        tokens = context or self.context_length
        per_token = self.layers * self.kv_heads * (self.key_length + self.value_length)
        return per_token * tokens * KV_BYTES_PER_ELEMENT


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise NeedMoreBytes(len(self.buf))
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack(self.take(fmt.size))[0]

    def string(self) -> str:
        return self.take(self.unpack(_U64)).decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise GGUFError(f"unknown metadata value type {vtype}")
        item_type = self.unpack(_U32)
        count = self.unpack(_U64)
        if not keep and item_type in _SCALAR:
            self.take(count * _SCALAR[item_type].size)
            return None
        if not keep and item_type == _STRING:  # tokenizer vocabularies: skip without copying
            buf, pos, unpack, end = self.buf, self.pos, _U64.unpack_from, len(self.buf)
            for _ in range(count):
                if pos + 8 > end:
                    raise NeedMoreBytes(end)
                pos += 8 + unpack(buf, pos)[0]
            if pos > end:
                raise NeedMoreBytes(end)
            self.pos = pos
            return None
        items = [self.value(item_type, keep) for _ in range(count)]
        return items if keep else None


def read_metadata(head: bytes, wanted: set[str] | None = None) -> tuple[dict[str, Any], bool]:
    """Metadata keys from the head of a GGUF file: every key, or only ``wanted`` ones (others are
    skipped, not decoded; reading stops once all are found). Returns what was read and whether the
    metadata was read to its end (or all wanted keys found) rather than cut off by a short head."""
    r = _Reader(head)
    if r.take(4) != b"GGUF":
        raise GGUFError("not a GGUF file (bad magic)")
    version = r.unpack(_U32)
    if version not in (2, 3):
        raise GGUFError(f"unsupported GGUF version {version}")
    found: dict[str, Any] = {}
    try:
        r.unpack(_U64)  # tensor count
        n_kv = r.unpack(_U64)
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack(_U32)
            keep = wanted is None or key in wanted
            value = r.value(vtype, keep)
            if keep:
                found[key] = value
            if wanted is not None and wanted <= found.keys():
                break
    except NeedMoreBytes:
        return found, False
    return found, True


def _int(value: Any, key: str) -> int:
    if isinstance(value, list):  # per-layer values (some architectures): the largest bounds the cache
        value = max(value, default=0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GGUFError(f"metadata {key} is not a count: {value!r}")
    return value


def model_shape(head: bytes) -> ModelShape:
    """The KV-cache shape of the model whose GGUF starts with ``head``."""
    meta, complete = read_metadata(head, {"general.architecture"})
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise NeedMoreBytes(len(head)) if not complete else GGUFError("GGUF has no general.architecture")
    keys = {
        "layers": f"{arch}.block_count",
        "heads": f"{arch}.attention.head_count",
        "kv_heads": f"{arch}.attention.head_count_kv",
        "embedding": f"{arch}.embedding_length",
        "key_length": f"{arch}.attention.key_length",
        "value_length": f"{arch}.attention.value_length",
        "context": f"{arch}.context_length",
    }
    meta, complete = read_metadata(head, set(keys.values()))
    # llama.cpp writes an architecture's keys before the tokenizer, so a head cut off later than the
    # required ones is taken as it is; absent optional keys then get their defaults.
    for required in ("layers", "heads", "embedding"):
        if keys[required] not in meta:
            raise NeedMoreBytes(len(head)) if not complete else GGUFError(f"GGUF has no {keys[required]}")
    layers = _int(meta[keys["layers"]], keys["layers"])
    heads = _int(meta[keys["heads"]], keys["heads"])
    kv_heads = _int(meta.get(keys["kv_heads"], heads), keys["kv_heads"])
    embedding = _int(meta[keys["embedding"]], keys["embedding"])
    head_dim = embedding // heads if heads else 0
    return ModelShape(
        architecture=arch,
        layers=layers,
        kv_heads=kv_heads,
        key_length=_int(meta.get(keys["key_length"], head_dim), keys["key_length"]),
        value_length=_int(meta.get(keys["value_length"], head_dim), keys["value_length"]),
        context_length=_int(meta.get(keys["context"], 0), keys["context"]),
    )


HEAD_BYTES = 4 << 20
MAX_HEAD_BYTES = 64 << 20


def head_of_file(path: Path, start: int = HEAD_BYTES) -> tuple[bytes, ModelShape]:
    """The shortest head of a local GGUF (``start`` bytes, x4 while the metadata runs on) that gives
    its shape, and the shape."""
    size = start
    with path.open("rb") as f:
        while True:
            f.seek(0)
            head = f.read(size)
            try:
                return head, model_shape(head)
            except NeedMoreBytes:
                if len(head) < size or size >= MAX_HEAD_BYTES:
                    raise GGUFError(
                        f"{path.name}: metadata not readable in its first {len(head)} bytes"
                    ) from None
                size *= 4


def shape_of_file(path: Path) -> ModelShape:
    """The shape of a local GGUF, reading only as much of its head as the metadata needs."""
    return head_of_file(path)[1]
