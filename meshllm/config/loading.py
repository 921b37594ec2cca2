"""Turn raw TOML into a :class:`~meshllm.config.sections.NodeConfig`, refusing what it does not know.

A typo such as ``nmae = "a"`` or ``port = "9337"`` must stop the node with a message that names the key
(``node.nmae``), says what was expected, and suggests the likely fix ("did you mean node.name?"),
instead of being silently ignored. This module owns that: the unknown-key and unknown-section checks,
the typed conversion of each raw value, path resolution against the config file's folder, and reading
the file itself (:func:`load_config`) with file-level errors (missing, not UTF-8, TOML syntax).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from meshllm.config.errors import ConfigError, describe, fail
from meshllm.config.hostport import HostPort
from meshllm.config.sections import (
    ApiSection,
    ConsoleSection,
    LlamaSection,
    LogSection,
    ModelSettings,
    ModelsSection,
    NodeConfig,
    NodeSection,
    StandbySection,
    TimingSection,
    check_name,
    check_positive,
    default_data_dir,
    default_node_name,
)

__all__ = ["load_config", "parse_config"]

_T = TypeVar("_T")

S = TypeVar("S")

_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "api": ApiSection,
    "console": ConsoleSection,
    "models": ModelsSection,
    "llama": LlamaSection,
    "log": LogSection,
    "timing": TimingSection,
    "standby": StandbySection,
}
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in _SECTIONS.items()
}


def _suggest(word: str, candidates: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


class _Table:
    """One section of raw TOML data; hands out typed values and names keys in errors."""

    def __init__(self, section: str, raw: object) -> None:
        self.section = section
        if not isinstance(raw, Mapping):
            raise fail(section, f"expected a table [{section}] (got {describe(raw)})")
        known = _SECTION_KEYS[section]
        for key in raw:
            if key not in known:
                hint = _suggest(str(key), known)
                message = f"unknown key {section}.{key}"
                if hint is not None:
                    message += f" (did you mean {section}.{hint}?)"
                else:
                    message += f" (known keys: {', '.join(known)})"
                raise ConfigError(message, key=f"{section}.{key}")
        self.raw: Mapping[str, Any] = raw

    def key(self, name: str) -> str:
        return f"{self.section}.{name}"

    def get(self, name: str, default: _T, convert: Callable[[str, Any], _T]) -> _T:
        if name not in self.raw:
            return default
        return convert(self.key(name), self.raw[name])


def _as_str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise fail(key, f"expected a string (got {describe(value)})")
    return value


def _as_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise fail(key, f"expected a boolean true/false (got {describe(value)})")
    return value


def _as_float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(key, f"expected a number (got {describe(value)})")
    return float(value)


def _as_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(key, f"expected a whole number (got {describe(value)})")
    return value


def _as_positive_float(key: str, value: object) -> float:
    number = _as_float(key, value)
    check_positive(key, number)
    return number


def _as_list(key: str, value: object, what: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        example = f'; write {key.rsplit(".", 1)[-1]} = ["..."]' if isinstance(value, str) else ""
        raise fail(key, f"expected an array of {what} (got {describe(value)}){example}")
    return list(value)


def _as_str_tuple(key: str, value: object) -> tuple[str, ...]:
    items = _as_list(key, value, "strings")
    out: list[str] = []
    for i, item in enumerate(items):
        item_key = f"{key}[{i}]"
        text = _as_str(item_key, item).strip()
        if not text:
            raise fail(item_key, "must not be empty")
        out.append(text)
    return tuple(out)


def _seconds_section(cls: type[S], table: _Table, section: str) -> S:
    """A section whose every key is a positive number, each defaulting to the dataclass's value."""
    defaults = cls()
    return cls(
        **{key: table.get(key, getattr(defaults, key), _as_positive_float) for key in _SECTION_KEYS[section]}
    )


def _as_hostport(key: str, value: object) -> HostPort:
    if not isinstance(value, str):
        raise fail(key, f'expected a "host:port" string (got {describe(value)})')
    return HostPort.parse(value, key)


def _as_hostport_tuple(key: str, value: object) -> tuple[HostPort, ...]:
    items = _as_list(key, value, '"host:port" strings')
    return tuple(_as_hostport(f"{key}[{i}]", item) for i, item in enumerate(items))


def _path_converter(base_dir: Path | None) -> Callable[[str, Any], Path]:
    def convert(key: str, value: object) -> Path:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise fail(key, f"expected a path string (got {describe(value)})")
        if not value.strip():
            raise fail(key, "must not be empty")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        return path

    return convert


_SETTING_KEYS = tuple(f.name for f in dataclasses.fields(ModelSettings))


def _model_settings(key: str, raw: object, to_path: Callable[[str, Any], Path]) -> dict[str, ModelSettings]:
    """``[models.settings]``: a table per model name, each with :class:`ModelSettings` keys."""
    if not isinstance(raw, Mapping):
        raise fail(key, f'expected a table per model, e.g. [{key}."<model>"] (got {describe(raw)})')
    out: dict[str, ModelSettings] = {}
    for name, table in raw.items():
        where = f"{key}.{name}"
        if not isinstance(table, Mapping):
            raise fail(where, f"expected a table of settings (got {describe(table)})")
        for item in table:
            if item not in _SETTING_KEYS:
                hint = _suggest(str(item), _SETTING_KEYS)
                more = f"did you mean {where}.{hint}?" if hint else f"known keys: {', '.join(_SETTING_KEYS)}"
                raise ConfigError(f"unknown key {where}.{item} ({more})", key=f"{where}.{item}")
        embeddings = table.get("embeddings", False)
        pooling = table.get("pooling")
        template = table.get("chat_template_file")
        try:
            out[str(name)] = ModelSettings(
                embeddings=_as_bool(f"{where}.embeddings", embeddings),
                pooling=None if pooling is None else _as_str(f"{where}.pooling", pooling),
                chat_template_file=None
                if template is None
                else to_path(f"{where}.chat_template_file", template),
            )
        except ConfigError as exc:
            if exc.key is not None and exc.key.startswith(where):
                raise
            raise ConfigError(f"{where}.{exc}", key=f"{where}.{exc.key}") from None
    return out


def _check_top_level(data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if key in _SECTIONS:
            continue
        owners = [section for section, keys in _SECTION_KEYS.items() if key in keys]
        if owners and not isinstance(value, Mapping):
            hint = f" (did you mean {owners[0]}.{key}? put it under [{owners[0]}])"
        else:
            close = _suggest(str(key), list(_SECTIONS))
            hint = f" (did you mean [{close}]?)" if close else f" (known sections: {', '.join(_SECTIONS)})"
        kind = "section" if isinstance(value, Mapping) else "key"
        where = f"[{key}]" if kind == "section" else str(key)
        raise ConfigError(f"unknown {kind} {where}{hint}", key=str(key))


def parse_config(
    data: Mapping[str, Any], base_dir: Path | None = None, source: Path | None = None
) -> NodeConfig:
    """Validate already-parsed TOML data (e.g. from :func:`tomllib.loads`) into a :class:`NodeConfig`.

    Relative paths (``node.data_dir``, ``llama.bin_dir``) are resolved against ``base_dir`` (normally the
    config file's folder), or the current directory when ``base_dir`` is ``None``; ``~`` is expanded.
    Raises :class:`ConfigError` naming the first offending key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table of sections (got {describe(data)})")
    _check_top_level(data)
    tables = {name: _Table(name, data.get(name, {})) for name in _SECTIONS}
    to_path = _path_converter(base_dir)

    n = tables["node"]
    name = n.get("name", None, _as_str)
    if name is None:
        name = default_node_name()
    check_name(name)
    node = NodeSection(
        name=name,
        role=n.get("role", "active", _as_str),
        data_dir=n.get("data_dir", default_data_dir(name), to_path),
        quic_listen=n.get("quic_listen", HostPort("0.0.0.0", 9338), _as_hostport),
        advertise=n.get("advertise", (), _as_hostport_tuple),
        join=n.get("join", (), _as_str_tuple),
        vram_gb=n.get("vram_gb", None, _as_positive_float),
    )

    api = ApiSection(
        listen=tables["api"].get("listen", ApiSection().listen, _as_hostport),
        api_keys=tables["api"].get("api_keys", (), _as_str_tuple),
        open=tables["api"].get("open", False, _as_bool),
    )
    console = ConsoleSection(
        listen=tables["console"].get("listen", ConsoleSection().listen, _as_hostport),
        api_keys=tables["console"].get("api_keys", (), _as_str_tuple),
        open=tables["console"].get("open", False, _as_bool),
    )

    m = tables["models"]
    models = ModelsSection(
        serve=m.get("serve", (), _as_str_tuple),
        force_split=m.get("force_split", False, _as_bool),
        context=m.get("context", ModelsSection().context, _as_int),
        cache_dir=m.get("cache_dir", None, to_path),
        settings=_model_settings(m.key("settings"), m.raw.get("settings", {}), to_path),
    )
    if node.role == "client" and models.serve:
        raise fail(
            "models.serve",
            "a client node serves no models; remove models.serve or set node.role to active or standby",
        )

    llama = LlamaSection(
        bin_dir=tables["llama"].get("bin_dir", None, to_path),
        threads=tables["llama"].get("threads", None, _as_int),
        tensor_cache=tables["llama"].get("tensor_cache", True, _as_bool),
    )

    lg = tables["log"]
    log = LogSection(format=lg.get("format", "json", _as_str), file=lg.get("file", False, _as_bool))

    timing = _seconds_section(TimingSection, tables["timing"], "timing")
    standby = _seconds_section(StandbySection, tables["standby"], "standby")

    return NodeConfig(
        node=node,
        standby=standby,
        api=api,
        console=console,
        models=models,
        llama=llama,
        log=log,
        timing=timing,
        source=source,
    )


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read and validate a ``node.toml``.

    A missing/unreadable file or a TOML syntax error raises :class:`ConfigError` naming the file (and, for
    syntax errors, the line and column). Validation errors are prefixed with the file name too, and keep
    the dotted key in :attr:`ConfigError.key`. Relative paths in the file resolve against its folder.
    """
    file = Path(path).expanduser().absolute()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not valid UTF-8 (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    try:
        return parse_config(data, base_dir=file.parent, source=file)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}", key=exc.key) from None
