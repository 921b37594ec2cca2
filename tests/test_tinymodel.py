"""The tiny generated model loads in the real ``llama-server`` and answers completions and chats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from meshllm.serving.llama import LlamaNotFound, find_binaries, free_port
from tests.support import wait_until
from tests.tinymodel import tiny_model, write_tiny_model

pytestmark = pytest.mark.llama

READY_TIMEOUT = 30.0
"""How long to wait for /health at all (the load time itself is printed, not asserted)."""


def _server_binary() -> Path:
    try:
        return find_binaries().server
    except LlamaNotFound as exc:  # a llama test without llama is a failure, not a skip
        pytest.fail(f"{exc} (or deselect: -m 'not llama')")


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:  # 503 while the model loads
        return exc.code
    except OSError:  # not listening yet
        return 0


def _post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30.0) as resp:
        return resp.status, resp.read()


def test_file_is_small_and_deterministic(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=3, n_layer=3)
    b = write_tiny_model(tmp_path / "b.gguf", seed=3, n_layer=3)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size < 2_000_000
    cached = tiny_model(tmp_path / "cache")
    assert cached.stat().st_size < 2_000_000
    mtime = cached.stat().st_mtime_ns
    assert tiny_model(tmp_path / "cache") == cached
    assert cached.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]


def test_llama_server_serves_tiny_model(tmp_path: Path) -> None:
    server = _server_binary()
    model = write_tiny_model(tmp_path / "tiny.gguf")
    size = model.stat().st_size
    assert size < 2_000_000
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "llama-server.log"
    cmd = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "256", "-t", "1"]
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            return _get_status(base + "/health") == 200

        wait_until(ready, READY_TIMEOUT, interval=0.02, what="llama-server /health")
        load_s = time.monotonic() - started
        print(f"tiny model: {size} bytes, llama-server ready in {load_s:.3f}s")

        status, raw = _post(base + "/v1/completions", {"prompt": "hi", "max_tokens": 8})
        assert status == 200
        completion = json.loads(raw)
        assert completion["choices"] and completion["choices"][0]["text"]

        chat_body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        status, raw = _post(base + "/v1/chat/completions", chat_body)
        assert status == 200
        chat = json.loads(raw)
        assert chat["choices"] and chat["choices"][0]["message"]["content"]

        status, raw = _post(base + "/v1/chat/completions", {**chat_body, "stream": True})
        assert status == 200
        events = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        deltas = [json.loads(e[len("data: ") :])["choices"] for e in events[:-1]]
        assert "".join(c[0]["delta"].get("content") or "" for c in deltas if c)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
