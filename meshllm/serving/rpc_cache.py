"""Fill ``ggml-rpc-server``'s tensor cache from a local GGUF, so split workers that already have the
GGUF receive almost no weight bytes over the mesh.

When ``llama-server --rpc`` loads a model, the RPC client first sends ``RPC_CMD_SET_TENSOR_HASH`` (the
FNV-1a 64 hash of the bytes) for every weight tensor *larger than* 10 MiB (``size > HASH_THRESHOLD``
in ``ggml-rpc.cpp``; a tensor of exactly 10 MiB is sent in full). An rpc-server started with ``-c``
answers from ``<cache>/rpc/<hash as 16 lowercase hex digits>``, a file holding the raw tensor bytes,
where ``<cache>`` is ``$LLAMA_CACHE``, else ``$XDG_CACHE_HOME/llama.cpp``, else ``~/.cache/llama.cpp``.
On a hit the tensor's bytes never cross the network; on a miss the client sends them and the server
saves them under that name (not atomically, and it never re-checks a file's content).

The bytes the client hashes are exactly the tensor's bytes in the GGUF, so a worker that has the file
can write those cache entries itself before the host connects: :func:`fill_rpc_cache` does that (each
file written atomically, exact bytes; where the tensors lie comes from
:mod:`meshllm.serving.gguf_layout`), and :func:`cache_dir_env` is the environment the supervisor
gives the rpc-server so it looks there. Only tensors over the threshold benefit: for SmolLM2-135M that
is the 30 MB token embedding alone, for 7B-class models most of the weight bytes.

A small manifest (``<cache>/rpc/manifest.json``) remembers, per GGUF path, size and mtime, which hashes
live at which offsets, so filling again for an unchanged file reads and hashes nothing.

:func:`fnv1a64` is exact FNV-1a 64. With numpy it runs at a few hundred MB/s: the low byte of the
state evolves on its own (the low bits of a product depend only on the low bits of its factors), and
each of its bits is a prefix XOR once the lower bits are known, so it is computed bit-sliced; the full
64-bit state then follows as ``h0 * P**n + sum(d_i * P**(n - i))`` with ``d_i = (s_i ^ b_i) - s_i``
(the XOR only touches the low byte), a wrapping uint64 dot product. Without numpy a plain loop runs.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.serving.gguf_layout import GGUFError, parse_tensors

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the manifest is then updated without a lock
    fcntl = None  # type: ignore[assignment]

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional; fnv1a64 falls back to a plain loop
    np = None  # type: ignore[assignment]

__all__ = [
    "HASH_THRESHOLD",
    "CacheFill",
    "cache_dir_env",
    "cache_file_name",
    "fill_rpc_cache",
    "fnv1a64",
]

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1

HASH_THRESHOLD = 10 * 1024 * 1024
"""llama.cpp's RPC client asks the server's cache only for weight tensors whose size is strictly greater."""

RPC_SUBDIR = "rpc"
MANIFEST_NAME = "manifest.json"
_MANIFEST_VERSION = 1
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0


# ---------------------------------------------------------------------------------------------------------
# FNV-1a 64


def _fnv_loop(data: memoryview, h: int) -> int:
    prime = FNV_PRIME
    mask = _MASK64
    for byte in data:
        h = ((h ^ byte) * prime) & mask
    return h


_CHUNK = 1 << 19  # bytes per vectorized step: big enough to amortize Python overhead, small enough for cache
_SMALL = 4096  # below this the loop is faster than setting up arrays
_LOW_PRIME = FNV_PRIME & 0xFF  # 0xb3: the low byte of the state only sees the low byte of the prime
_powers: Any = None  # numpy uint64 array: P**_CHUNK .. P**1 (built on first use)


def _chunk_powers() -> Any:
    global _powers
    if _powers is None:
        _powers = np.multiply.accumulate(np.full(_CHUNK, FNV_PRIME, dtype=np.uint64))[::-1].copy()
    return _powers


def _transpose8(x: Any) -> None:
    """Transpose, in place, the 8x8 bit matrix in each uint64 (bit 8*r + c <-> bit 8*c + r)."""
    t = np.empty_like(x)
    for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)):
        sh = np.uint64(shift)
        np.right_shift(x, sh, out=t)
        t ^= x
        t &= np.uint64(mask)
        x ^= t
        np.left_shift(t, sh, out=t)
        x ^= t


_PREFIX_SHIFTS: tuple[Any, ...] = () if np is None else tuple(np.uint64(1 << i) for i in range(6))
_PRIME_TERMS = tuple(j for j in range(1, 8) if (_LOW_PRIME >> j) & 1)  # bits of 0xb3 above bit 0


def _low_states(b: Any, s0: int) -> Any:
    """The low byte of the FNV state before each byte of ``b`` (uint8, length a multiple of 64).

    ``s[i+1] = ((s[i] ^ b[i]) * 0xb3) & 0xff``. Bit k of a product by an odd constant is bit k of the
    multiplicand XOR a function of its lower bits, so once bits 0..k-1 of every state are known, bit k
    of the states is a prefix XOR of a known sequence. Each bit plane is packed 64 positions to a
    uint64 word; the lower-bit function is a bit-sliced column sum (a 3-bit counter of carries).
    """
    n = b.size
    words = n // 64
    x = b.view("<u8").copy()
    _transpose8(x)  # byte k of each word now holds bit k of 8 consecutive data bytes
    planes = np.ascontiguousarray(x.view(np.uint8).reshape(n // 8, 8).T).view("<u8")  # (8, words)
    states = np.empty((8, words), dtype=np.uint64)
    ys: list[Any] = []
    c0 = np.zeros(words, dtype=np.uint64)  # carry counter of the product's current column, bit-sliced
    c1 = np.zeros(words, dtype=np.uint64)
    c2 = np.zeros(words, dtype=np.uint64)
    carry = np.empty(words, dtype=np.uint64)
    tmp = np.empty(words, dtype=np.uint64)
    top = np.uint64(63)

    def add(v: Any) -> None:
        np.bitwise_and(c0, v, out=carry)
        c0[...] ^= v
        np.bitwise_and(c1, carry, out=tmp)
        c1[...] ^= carry
        c2[...] ^= tmp

    for k in range(8):
        for j in _PRIME_TERMS:
            if j <= k:
                add(ys[k - j])
        bk = planes[k]
        flips = c0 ^ bk  # bit k of state i+1 = bit k of state i ^ flips[i]
        acc = flips.copy()
        for shift in _PREFIX_SHIFTS:
            np.left_shift(acc, shift, out=tmp)
            acc ^= tmp
        word_parity = np.bitwise_xor.accumulate(acc >> top)
        np.negative(word_parity, out=word_parity)
        acc[1:] ^= word_parity[:-1]
        sk = states[k]
        np.bitwise_xor(acc, flips, out=sk)  # exclusive prefix: the bit before each byte
        if (s0 >> k) & 1:
            np.invert(sk, out=sk)
        yk = sk ^ bk
        ys.append(yk)
        if k < 7:
            add(yk)
            c0, c1, c2 = c1, c2, c0  # the column's sum halved is the next column's carry
            c2[...] = 0
    out = np.ascontiguousarray(states.view(np.uint8).reshape(8, n // 8).T).view("<u8").reshape(-1)
    _transpose8(out)
    return out.view(np.uint8)


def _fnv_numpy(data: memoryview, h: int) -> int:
    n = len(data)
    powers = _chunk_powers()
    whole = np.frombuffer(data, dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        b = whole[start : start + _CHUNK]
        m = b.size
        if m % 64:
            padded = np.zeros(m + 64 - m % 64, dtype=np.uint8)  # later bytes never change earlier states
            padded[:m] = b
            states = _low_states(padded, h & 0xFF)[:m]
        else:
            states = _low_states(b, h & 0xFF)
        d = (states ^ b).astype(np.int16)
        d -= states
        part = int(np.dot(d.astype(np.int64).view(np.uint64), powers[_CHUNK - m :]))  # sum d_i * P**(m-i)
        h = (h * pow(FNV_PRIME, m, 1 << 64) + part) & _MASK64
    return h


def fnv1a64(data: bytes | bytearray | memoryview, h: int = FNV_OFFSET) -> int:
    """FNV-1a 64 of ``data`` (exactly what llama.cpp's ``fnv_hash`` computes); ``h`` continues a hash."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format != "B":
        view = view.cast("B")
    if np is None or len(view) < _SMALL:
        return _fnv_loop(view, h)
    return _fnv_numpy(view, h)


def cache_file_name(digest: int) -> str:
    """The rpc-server's file name for a hash: 16 lowercase hex digits (``%016" PRIx64``)."""
    return f"{digest:016x}"


# ---------------------------------------------------------------------------------------------------------
# Cache fill


@dataclass(frozen=True)
class CacheFill:
    """What one :func:`fill_rpc_cache` did."""

    files_written: int
    bytes_written: int
    files_present: int  # already there with the right size (including duplicates within the GGUF)
    seconds: float
    bytes_hashed: int = 0  # 0 when the manifest already knew the file


def cache_dir_env(cache_dir: Path) -> dict[str, str]:
    """Environment for ``ggml-rpc-server -c`` so it reads (and writes) ``cache_dir/rpc``."""
    return {"LLAMA_CACHE": str(cache_dir)}


def _manifest_key(gguf: Path, st: os.stat_result) -> str:
    return f"{gguf}|{st.st_size}|{st.st_mtime_ns}"


@contextlib.contextmanager
def _locked(rpc_dir: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(rpc_dir / ".manifest.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read_manifest(rpc_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((rpc_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != _MANIFEST_VERSION:
        return {}
    files = raw.get("files")
    return files if isinstance(files, dict) else {}


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _known_entries(entry: Any, threshold: int) -> list[tuple[int, int, int]] | None:
    """The manifest's ``(hash, offset, n_bytes)`` over ``threshold``, or None if it cannot answer."""
    if not isinstance(entry, dict):
        return None
    recorded = entry.get("threshold")
    tensors = entry.get("tensors")
    if not isinstance(recorded, int) or recorded > threshold or not isinstance(tensors, list):
        return None  # recorded for a higher bar: smaller tensors were never hashed
    out: list[tuple[int, int, int]] = []
    for item in tensors:
        if not (isinstance(item, list) and len(item) == 3):
            return None
        digest, offset, n_bytes = item
        if not (isinstance(digest, str) and len(digest) == 16 and isinstance(offset, int)):
            return None
        if not isinstance(n_bytes, int):
            return None
        try:
            value = int(digest, 16)
        except ValueError:
            return None
        if n_bytes > threshold:
            out.append((value, offset, n_bytes))
    return out


def _update_manifest(
    rpc_dir: Path, key: str, gguf: Path, threshold: int, entries: list[tuple[int, int, int]]
) -> None:
    with _locked(rpc_dir):
        files = _read_manifest(rpc_dir)
        prefix = f"{gguf}|"
        for old in [k for k in files if k.startswith(prefix) or not Path(k.rsplit("|", 2)[0]).exists()]:
            del files[old]  # this path's older versions, and files that are gone
        files[key] = {
            "threshold": threshold,
            "tensors": [[cache_file_name(d), offset, n_bytes] for d, offset, n_bytes in entries],
        }
        body = json.dumps({"version": _MANIFEST_VERSION, "files": files}, indent=1, sort_keys=True)
        _write_atomic(rpc_dir / MANIFEST_NAME, body.encode())


def _remove_stale_tmp(rpc_dir: Path) -> None:
    now = time.time()
    for tmp in rpc_dir.glob(f"{_TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                tmp.unlink()


def fill_rpc_cache(gguf: Path, cache_dir: Path, threshold: int = HASH_THRESHOLD) -> CacheFill:
    """Write ``cache_dir/rpc/<fnv1a64 hex>`` for every tensor of ``gguf`` bigger than ``threshold`` bytes.

    Files already present with the right size are kept. Each file is written to a temporary name and
    renamed into place, so an rpc-server never reads a partial one. A second call for an unchanged
    GGUF (same path, size and mtime) hashes nothing: the manifest gives the names.
    Raises :class:`GGUFError` for a file that is not a readable GGUF, ``OSError`` for I/O errors.
    """
    started = time.monotonic()
    gguf = Path(gguf).resolve()
    rpc_dir = Path(cache_dir) / RPC_SUBDIR
    rpc_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(rpc_dir)
    written = bytes_written = present = hashed = 0
    with open(gguf, "rb") as f:
        st = os.fstat(f.fileno())
        key = _manifest_key(gguf, st)
        known = _known_entries(_read_manifest(rpc_dir).get(key), threshold)
        if st.st_size == 0:
            raise GGUFError(f"{gguf} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                if known is None:
                    entries: list[tuple[int, int, int]] = []
                    for span in parse_tensors(buf):
                        if span.n_bytes > threshold:
                            data = view[span.offset : span.offset + span.n_bytes]
                            entries.append((fnv1a64(data), span.offset, span.n_bytes))
                            hashed += span.n_bytes
                            data.release()
                else:
                    entries = known
                seen: set[int] = set()
                for digest, offset, n_bytes in entries:
                    target = rpc_dir / cache_file_name(digest)
                    if digest in seen or _has_size(target, n_bytes):
                        present += 1
                        continue
                    seen.add(digest)
                    data = view[offset : offset + n_bytes]
                    try:
                        _write_atomic(target, data)
                    finally:
                        data.release()
                    written += 1
                    bytes_written += n_bytes
            finally:
                view.release()
    if known is None:
        _update_manifest(rpc_dir, key, gguf, threshold, entries)
    return CacheFill(written, bytes_written, present, time.monotonic() - started, hashed)


def _has_size(path: Path, n_bytes: int) -> bool:
    try:
        return path.stat().st_size == n_bytes
    except OSError:
        return False
