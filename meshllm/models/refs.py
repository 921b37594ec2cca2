"""Model references: what a ``[models] serve`` entry or ``meshllm download REF`` may say, parsed
without I/O.

- a catalog name (``smollm2-135m``; :mod:`meshllm.models.catalog`);
- ``org/repo:file.gguf`` (a file in a Hugging Face repo, folders allowed), ``org/repo:Q4_K_M`` (the
  file, or split shards, whose name carries that quantisation), optionally ``org/repo@revision:...``;
- ``hf://org/repo/path/file.gguf``, or a hub resolve URL
  (``https://huggingface.co/org/repo/resolve/main/file.gguf``);
- anything else is a path to a local GGUF file.

Each reference has the name the mesh knows the model by (what clients put in ``"model"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_COLON = re.compile(rf"^(?P<repo>{_REPO})(?:@(?P<rev>[A-Za-z0-9._/-]+))?:(?P<what>[^:]+)$")
_QUANT = re.compile(r"^(?:I?Q\d[A-Za-z0-9_]*|F16|BF16|F32)$", re.IGNORECASE)
SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class BadReference(ValueError):
    """A reference that looks like a hub reference but cannot be one."""


@dataclass(frozen=True)
class LocalRef:
    path: str

    @property
    def text(self) -> str:
        return self.path


@dataclass(frozen=True)
class CatalogRef:
    name: str

    @property
    def text(self) -> str:
        return self.name


@dataclass(frozen=True)
class HubRef:
    """A model on the hub: one file (``filename``), or the file(s) of one quantisation (``quant``)."""

    repo: str
    filename: str = ""
    quant: str = ""
    revision: str = "main"

    @property
    def text(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"{self.repo}{rev}:{self.filename or self.quant}"

    @property
    def name(self) -> str:
        """The mesh name: the file's stem without shard numbering, or for a quantisation the repo's
        name without a ``-GGUF`` suffix plus the quant (``Llama-3.2-1B-Instruct-Q4_K_M``)."""
        if self.filename:
            return model_stem(self.filename)
        base = re.sub(r"[-_.]gguf$", "", self.repo.split("/", 1)[1], flags=re.IGNORECASE)
        return f"{base}-{self.quant}"


ModelReference = LocalRef | CatalogRef | HubRef


def model_stem(filename: str) -> str:
    """``dir/Model-Q4_K_M-00001-of-00003.gguf`` -> ``Model-Q4_K_M``."""
    base = filename.rsplit("/", 1)[-1]
    shard = SHARD.match(base)
    if shard:
        return shard["stem"]
    return base.removesuffix(".gguf")


def _hub_file(repo: str, filename: str, revision: str = "main") -> HubRef:
    if not filename.endswith(".gguf"):
        raise BadReference(f"{repo}:{filename}: a model file must be a .gguf file")
    if ".." in filename.split("/"):
        raise BadReference(f"{repo}:{filename}: '..' is not allowed in a hub path")
    return HubRef(repo=repo, filename=filename, revision=revision)


def parse_reference(text: str, catalog: frozenset[str] | set[str] = frozenset()) -> ModelReference:
    """Parse a reference (see the module docstring). ``catalog`` is the set of catalog names."""
    entry = text.strip()
    if entry in catalog:
        return CatalogRef(entry)
    if entry.startswith("hf://"):
        parts = entry[len("hf://") :].split("/")
        if len(parts) < 3 or not all(parts):
            raise BadReference(f"{entry!r}: expected hf://org/repo/file.gguf")
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    if entry.startswith(("https://", "http://")):
        url = urlsplit(entry)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if parts and parts[0] == "models":
            parts = parts[1:]
        if len(parts) < 5 or parts[2] != "resolve":
            raise BadReference(
                f"{entry!r}: expected a hub URL like https://HOST/org/repo/resolve/main/file.gguf"
            )
        return _hub_file("/".join(parts[:2]), "/".join(parts[4:]), parts[3])
    hub = _HUB_COLON.match(entry)
    if hub:
        repo, revision, what = hub["repo"], hub["rev"] or "main", hub["what"]
        if what.endswith(".gguf"):
            return _hub_file(repo, what, revision)
        if _QUANT.match(what):
            return HubRef(repo=repo, quant=what.upper(), revision=revision)
        raise BadReference(f"{entry!r}: after the colon, a .gguf file name or a quantisation such as Q4_K_M")
    return LocalRef(entry)
