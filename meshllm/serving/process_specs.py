"""The llama.cpp children a serving plan asks for, as :class:`ProcessSpec` messages.

The Election decides *what* runs (solo server, split host, rpc-server worker); this module says how
each is spelled for the Supervisor: keys, arguments, environment. Two specs with equal fields are the
same child, so an unchanged plan never restarts anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from meshllm.models.catalog import ModelRef
from meshllm.serving.rpc_cache import cache_dir_env
from meshllm.wire.messages import ProcessSpec

SPLIT_SERVER_ARGS = ("-ngl", "999", "-ot", r"token_embd\.weight=CPU")
"""All layers on the RPC devices; the (often tied) embedding/output matrix stays with llama-server,
so logits are computed on the host instead of crossing the tunnel every token."""


def server_key(model: str) -> str:
    return f"server:{model}"


def rpc_key(model: str) -> str:
    return f"rpc:{model}"


def parse_key(key: str) -> tuple[str, str]:
    """``"server:m"`` -> ("server", "m"); ``"rpc:m"`` -> ("rpc", "m")."""
    kind, _, model = key.partition(":")
    return kind, model


def thread_args(threads: int | None) -> tuple[str, ...]:
    return ("-t", str(threads)) if threads else ()


def server_spec(
    ref: ModelRef, threads: int | None, extra: Sequence[str] = (), context: int | None = None
) -> ProcessSpec:
    """llama-server for a model; ``--alias`` makes answers name the model as clients asked for it,
    ``-c`` is the context the fit check counted (None: llama.py's default)."""
    ctx = ("-c", str(context)) if context is not None else ()
    return ProcessSpec(
        key=server_key(ref.name),
        kind="llama-server",
        model_path=str(ref.path),
        args=("--alias", ref.name, *ctx, *thread_args(threads), *extra),
    )


def split_server_spec(
    ref: ModelRef,
    threads: int | None,
    rpc_ports: Sequence[int],
    fractions: Sequence[float],
    context: int | None = None,
) -> ProcessSpec:
    """The host's llama-server of a split: its RPC devices (own rpc-server first, then the tunnel
    listeners to the workers, in plan order) and the tensor split that follows the plan."""
    args = (
        "--rpc",
        ",".join(f"127.0.0.1:{p}" for p in rpc_ports),
        "--tensor-split",
        ",".join(f"{f:g}" for f in fractions),
    )
    return server_spec(ref, threads, args + SPLIT_SERVER_ARGS, context)


def rpc_spec(model: str, threads: int | None, cache_dir: Path | None = None) -> ProcessSpec:
    """An rpc-server for a model; with a cache dir it serves tensors from the cache (``-c``)."""
    if cache_dir is None:
        return ProcessSpec(key=rpc_key(model), kind="rpc-server", model_path="", args=thread_args(threads))
    return ProcessSpec(
        key=rpc_key(model),
        kind="rpc-server",
        model_path="",
        args=("-c", *thread_args(threads)),
        env=cache_dir_env(cache_dir),
    )
