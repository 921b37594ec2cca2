"""The llama.cpp children a serving plan asks for, as :class:`ProcessSpec` messages.

The Election decides *what* runs (solo server, split host, rpc-server worker); this module says how
each is spelled for the Supervisor: keys, arguments, environment. Two specs with equal fields are the
same child, so an unchanged plan never restarts anything.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from meshllm.config.sections import ModelSettings
from meshllm.models.catalog import ModelRef
from meshllm.models.gguf_shape import HEAD_BYTES, read_metadata, shape_of_file
from meshllm.serving.gguf_layout import GGUFError
from meshllm.serving.llama import SERVER_DEFAULT_ARGS
from meshllm.serving.rpc_cache import cache_dir_env
from meshllm.serving.tensor_split import format_split
from meshllm.wire.messages import ProcessSpec

GPU_OFFLOAD_ARGS = ("-ngl", "999")
"""Every layer on the GPUs (the Election only plans a model where it fits)."""
SPLIT_SERVER_ARGS = (*GPU_OFFLOAD_ARGS, "-ot", r"token_embd\.weight=CPU")
"""All layers on the RPC devices; the (often tied) embedding/output matrix stays with llama-server,
so logits are computed on the host instead of crossing the tunnel every token."""
GPU_SPLIT_SERVER_ARGS = GPU_OFFLOAD_ARGS
"""A host with GPUs of its own: llama.cpp puts the output layer on the last device of the model, a
local GPU, so the logits stay on the host without pinning the matrix to the CPU."""


CHAT_ARGS = ("--jinja",)
"""Chat through the model's Jinja template, which is what lets llama-server take ``tools`` and
answer with ``tool_calls`` (the default in current llama.cpp; said anyway for older builds)."""
DEFAULT_POOLING = "mean"
"""Pooling for an embeddings model whose GGUF names none (a chat model asked for embeddings)."""


def _default_context() -> int:
    flags = list(SERVER_DEFAULT_ARGS)
    return int(flags[flags.index("-c") + 1]) if "-c" in flags else 0


def served_context(ref: ModelRef, context: int | None) -> int:
    """The context (tokens) llama-server runs ``ref`` with: ``-c`` as :func:`server_spec` gives it,
    the model's own when that is 0 (0 when its GGUF does not say)."""
    if context is None:
        return _default_context()
    if context:
        return context
    try:
        return shape_of_file(ref.path).context_length
    except (GGUFError, OSError):
        return 0


@functools.lru_cache(maxsize=64)
def names_pooling(path: str) -> bool:
    """Whether a GGUF says how its embeddings are pooled (``<arch>.pooling_type``, as embedding models
    do); a file that cannot be read counts as not."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        arch = read_metadata(head, {"general.architecture"})[0].get("general.architecture")
        return (
            isinstance(arch, str)
            and f"{arch}.pooling_type" in read_metadata(head, {f"{arch}.pooling_type"})[0]
        )
    except (GGUFError, OSError):
        return False


def model_args(ref: ModelRef, settings: ModelSettings | None, context: int | None) -> tuple[str, ...]:
    """The llama-server arguments a model's ``[models.settings]`` ask for, after :data:`CHAT_ARGS`.

    Embeddings: ``--embeddings``, the pooling (the configured one, else the model's own, else
    :data:`DEFAULT_POOLING`), and a batch as large as the context, since llama-server embeds each input
    in one batch (at its default of 512 tokens a longer input is refused)."""
    if settings is None:
        return CHAT_ARGS
    args: list[str] = list(CHAT_ARGS)
    if settings.chat_template_file is not None:
        args += ["--chat-template-file", str(settings.chat_template_file)]
    if settings.embeddings:
        args.append("--embeddings")
        pooling = settings.pooling or (None if names_pooling(str(ref.path)) else DEFAULT_POOLING)
        if pooling is not None:
            args += ["--pooling", pooling]
        tokens = served_context(ref, context)
        if tokens:
            args += ["-b", str(tokens), "-ub", str(tokens)]
    return tuple(args)


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
    ref: ModelRef,
    threads: int | None,
    extra: Sequence[str] = (),
    context: int | None = None,
    gpu: bool = False,
    settings: ModelSettings | None = None,
) -> ProcessSpec:
    """llama-server for a model; ``--alias`` makes answers name the model as clients asked for it,
    ``-c`` is the context the fit check counted (None: llama.py's default). ``gpu``: this node's build
    lists GPUs, so every layer goes to them (spread by free memory, llama.cpp's default); a CPU build
    gets no ``-ngl`` at all, as before. ``settings``: the model's ``[models.settings]`` (:func:`model_args`)."""
    ctx = ("-c", str(context)) if context is not None else ()
    offload = GPU_OFFLOAD_ARGS if gpu else ()
    own = model_args(ref, settings, context)
    return ProcessSpec(
        key=server_key(ref.name),
        kind="llama-server",
        model_path=str(ref.path),
        args=("--alias", ref.name, *ctx, *thread_args(threads), *own, *offload, *extra),
    )


def split_server_spec(
    ref: ModelRef,
    threads: int | None,
    rpc_ports: Sequence[int],
    split: Sequence[float],
    context: int | None = None,
    gpu_host: bool = False,
    settings: ModelSettings | None = None,
) -> ProcessSpec:
    """The host's llama-server of a split: its RPC devices (a CPU host's own rpc-server first, then
    the tunnel listeners to the workers, in plan order) and the tensor split, one weight per device in
    llama.cpp's model order (:mod:`meshllm.serving.tensor_split`; for CPU nodes, the plan's fractions).
    ``gpu_host``: the host's share is on its own GPUs, which come last in that order."""
    args = ("--rpc", ",".join(f"127.0.0.1:{p}" for p in rpc_ports), "--tensor-split", format_split(split))
    return server_spec(
        ref,
        threads,
        args + (GPU_SPLIT_SERVER_ARGS if gpu_host else SPLIT_SERVER_ARGS),
        context,
        settings=settings,
    )


def rpc_spec(
    model: str, threads: int | None, cache_dir: Path | None = None, devices: Sequence[str] = ()
) -> ProcessSpec:
    """An rpc-server for a model; with a cache dir it serves tensors from the cache (``-c``).
    ``devices``: this node's GPUs as llama.cpp names them (``CUDA0``), all exposed by the one server
    (``-d``), the ones the node counted and announced; none: llama.cpp's choice (the CPU, on a CPU build)."""
    dev = ("-d", ",".join(devices)) if devices else ()
    if cache_dir is None:
        return ProcessSpec(
            key=rpc_key(model), kind="rpc-server", model_path="", args=(*dev, *thread_args(threads))
        )
    return ProcessSpec(
        key=rpc_key(model),
        kind="rpc-server",
        model_path="",
        args=(*dev, "-c", *thread_args(threads)),
        env=cache_dir_env(cache_dir),
    )
