"""Choosing the file(s) of a model in a hub repository's listing: by quantisation, and with every
shard of a split GGUF (``name-00001-of-00003.gguf``) together. Pure: the listing comes from outside."""

from __future__ import annotations

import re
from collections.abc import Iterable

from meshllm.models.refs import SHARD


class FileChoiceError(LookupError):
    """No file, or more than one candidate, for what was asked; the message lists what exists."""


def _quant_pattern(quant: str) -> re.Pattern[str]:
    # Q4_K_M must not match IQ4_K_M (letter before) or Q4_K_M_L (more after).
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)


def _is_model_file(path: str) -> bool:
    base = path.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith("mmproj")


def shard_set(files: Iterable[str], first: str) -> tuple[str, ...]:
    """Every shard that belongs with ``first`` (in order), or just ``first`` when it is not split.
    Raises FileChoiceError when shards are missing."""
    folder, _, base = first.rpartition("/")
    match = SHARD.match(base)
    if not match:
        return (first,)
    count = int(match["count"])
    prefix = f"{folder}/" if folder else ""
    wanted = [f"{prefix}{match['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    present = set(files)
    missing = [w for w in wanted if w not in present]
    if missing:
        raise FileChoiceError(
            f"split GGUF {first} is missing {len(missing)} of {count} shards: {missing[0]}, ..."
        )
    return tuple(wanted)


def _groups(paths: Iterable[str]) -> dict[str, list[str]]:
    """Model files grouped so that the shards of one split GGUF are one group, keyed by its first."""
    groups: dict[str, list[str]] = {}
    for path in sorted(paths):
        folder, _, base = path.rpartition("/")
        match = SHARD.match(base)
        key = f"{folder}/{match['stem']}" if match else path
        groups.setdefault(key, []).append(path)
    return groups


def quants_in(files: Iterable[str]) -> list[str]:
    """The quantisations a listing offers (for error messages)."""
    found = set()
    for path in files:
        if _is_model_file(path):
            for token in re.findall(r"(?<![A-Za-z0-9])(I?Q\d[A-Za-z0-9_]*?|BF16|F16|F32)(?=[-.]|$)", path):
                found.add(token.upper())
    return sorted(found)


def files_for_quant(files: Iterable[str], quant: str) -> tuple[str, ...]:
    """The file, or every shard of the split file, whose name carries ``quant``."""
    listing = list(files)
    pattern = _quant_pattern(quant)
    matching = [f for f in listing if _is_model_file(f) and pattern.search(f.rsplit("/", 1)[-1])]
    groups = _groups(matching)
    if not groups:
        offered = ", ".join(quants_in(listing)) or "no GGUF files"
        raise FileChoiceError(f"no {quant} file in the repository (it has: {offered})")
    if len(groups) > 1:
        names = ", ".join(sorted(groups))
        raise FileChoiceError(f"more than one {quant} model in the repository ({names}): name the file")
    first = next(iter(groups.values()))[0]
    return shard_set(listing, first)


def files_for_name(files: Iterable[str], filename: str) -> tuple[str, ...]:
    """A named file (and its sibling shards when it is one shard of a split GGUF)."""
    listing = list(files)
    if filename not in listing:
        raise FileChoiceError(f"no file {filename} in the repository")
    return shard_set(listing, filename)
