"""Filling the rpc-server tensor cache from a local GGUF off the caller's thread.

A fill reads and hashes hundreds of MB; an actor must not stall its inbox on it. The result comes
back as an :class:`RpcCacheFilled` message through the callback, also when the fill failed (the
rpc-server then starts with a cold cache).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from meshllm.models.catalog import ModelRef
from meshllm.serving.rpc_cache import fill_rpc_cache
from meshllm.wire.messages import RpcCacheFilled


def fill_in_background(
    ref: ModelRef, cache_dir: Path, report: Callable[[RpcCacheFilled], None]
) -> threading.Thread:
    def fill() -> None:
        try:
            done = fill_rpc_cache(ref.path, cache_dir)
            msg = RpcCacheFilled(model=ref.name, files=done.files_written, bytes_written=done.bytes_written)
        except Exception as exc:  # whatever went wrong, the rpc-server still starts (cold cache)
            msg = RpcCacheFilled(model=ref.name, files=0, bytes_written=0, error=str(exc))
        report(msg)

    thread = threading.Thread(target=fill, name=f"rpc-cache-{ref.name}", daemon=True)
    thread.start()
    return thread
