"""Node configuration: parse and validate ``node.toml``.

A meshllm node is configured by one TOML file (see ``config/*.toml`` for commented examples). This module
turns that file into frozen dataclasses and rejects anything it does not understand *before* the node
starts: a typo such as ``nmae = "a"`` or ``port = "9337"`` should stop the node with a message that names
the key (``node.nmae``), says what was expected, and suggests the likely fix, instead of being silently
ignored or failing later somewhere far from the file.

Every section and every key is optional; :func:`default_config` is the built-in configuration for a solo
node. Errors are :class:`ConfigError` (a ``ValueError``) whose message starts with the dotted key, e.g.
``node.role: must be one of active, client, standby (got 'x')``.

The dataclasses validate their own invariants (role names, positive timings, ...) in ``__post_init__``,
so a config built in code or changed with :func:`dataclasses.replace` / :meth:`NodeConfig.with_node` is
checked too. Type checking of raw TOML values and path resolution happen in :func:`parse_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "LOG_FORMATS",
    "ROLES",
    "ApiSection",
    "ConfigError",
    "ConsoleSection",
    "HostPort",
    "LlamaSection",
    "LogSection",
    "ModelsSection",
    "NodeConfig",
    "NodeSection",
    "TimingSection",
    "default_config",
    "default_data_dir",
    "default_node_name",
    "load_config",
    "parse_config",
]

ROLES: tuple[str, ...] = ("active", "client", "standby")
LOG_FORMATS: tuple[str, ...] = ("json", "console")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """A config problem; the message names the offending key.

    Example: ``node.role: must be one of active, client, standby (got 'x')``. ``key`` holds the dotted key
    (``"node.role"``) when the problem is about one key, else ``None`` (e.g. a file that cannot be read).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}", key=key)


def _describe(value: object) -> str:
    """Name a raw value in TOML terms, for "expected X (got Y)" messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


# --------------------------------------------------------------------------------------------- HostPort

_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _check_host(host: str, key: str, text: str) -> None:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail(key, f"{host!r} is not a valid IPv6 address (got {text!r})") from None
        return
    if not _HOSTNAME_RE.fullmatch(host):
        raise _fail(key, f"{host!r} is not a valid host name or IP address (got {text!r})")
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _fail(key, f"{host!r} is not a valid IPv4 address (got {text!r})") from None


@dataclass(frozen=True)
class HostPort:
    """A ``host:port`` address. IPv6 hosts are stored without brackets (``HostPort("::1", 9000)``)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str) -> HostPort:
        """Parse ``"127.0.0.1:9337"``, ``"[::1]:9000"`` or ``"localhost:0"`` (port 0 = pick a free port).

        ``key`` is the dotted config key used in the :class:`ConfigError` raised for a bad address.
        """
        if not isinstance(text, str):
            raise _fail(key, f'expected a "host:port" string (got {_describe(text)})')
        stripped = text.strip()
        if not stripped:
            raise _fail(key, 'expected "host:port", e.g. "127.0.0.1:9337" (got an empty string)')
        if stripped.startswith("["):
            close = stripped.find("]")
            if close < 0:
                raise _fail(key, f"missing ']' after the IPv6 address (got {text!r})")
            host, rest = stripped[1:close], stripped[close + 1 :]
            if not host:
                raise _fail(key, f"missing host between '[' and ']' (got {text!r})")
            if ":" not in host:
                raise _fail(key, f"brackets are only for IPv6 addresses (got {text!r})")
            if not rest.startswith(":"):
                raise _fail(key, f'missing port: expected "[{host}]:PORT" (got {text!r})')
            port_text = rest[1:]
        else:
            if "://" in stripped:
                raise _fail(
                    key, f'expected "host:port" without a URL scheme, e.g. "127.0.0.1:9337" (got {text!r})'
                )
            host, sep, port_text = stripped.rpartition(":")
            if not sep:
                raise _fail(key, f'missing port: expected "host:port", e.g. "{stripped}:9337" (got {text!r})')
            if ":" in host:
                raise _fail(key, f'IPv6 addresses need brackets, e.g. "[::1]:9000" (got {text!r})')
            if not host:
                raise _fail(key, f'missing host: expected "host:port", e.g. "127.0.0.1{stripped}"')
        _check_host(host, key, text)
        if not port_text:
            raise _fail(key, f"missing port after ':' (got {text!r})")
        if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
            raise _fail(key, f"port must be a number 0..65535 (got {port_text!r} in {text!r})")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        """True for ``0.0.0.0`` / ``::`` (listen on every interface; not an address a peer can dial)."""
        return self.host in _WILDCARD_HOSTS


# --------------------------------------------------------------------------------------------- sections


def _positive(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, f"expected a number (got {_describe(value)})")
    if not math.isfinite(value) or value <= 0:
        raise _fail(key, f"must be a number > 0 (got {value})")


def _check_name(name: str, key: str = "node.name") -> None:
    if not isinstance(name, str):
        raise _fail(key, f"expected a string (got {_describe(name)})")
    if not name:
        raise _fail(key, "must not be empty")
    if any(ch.isspace() for ch in name):
        raise _fail(key, f"must not contain whitespace (got {name!r})")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise _fail(key, f"must not contain path separators or be '.'/'..' (got {name!r})")
    if not name.isprintable():
        raise _fail(key, f"must not contain control characters (got {name!r})")


def default_node_name() -> str:
    """The default ``node.name``: this machine's host name (``"meshllm"`` if it has none usable)."""
    name = socket.gethostname().strip()
    try:
        _check_name(name)
    except ConfigError:
        return "meshllm"
    return name


def default_data_dir(name: str) -> Path:
    """The default ``node.data_dir`` for a node called ``name``: ``~/.local/share/meshllm/<name>``."""
    return Path.home() / ".local" / "share" / "meshllm" / name


@dataclass(frozen=True, kw_only=True)
class NodeSection:
    """``[node]``: who this node is and how it reaches the mesh."""

    name: str
    """Node name shown to peers and in logs; non-empty, no whitespace. Default: the host name."""
    data_dir: Path
    """Where the node keeps its identity key, state and logs. Default: ``~/.local/share/meshllm/<name>``."""
    role: str = "active"
    """``active`` (serves models and API), ``client`` (API only, contributes nothing) or ``standby``."""
    quic_listen: HostPort = HostPort("0.0.0.0", 9338)
    """UDP address for mesh (QUIC) traffic; port 0 picks a free port."""
    advertise: tuple[HostPort, ...] = ()
    """Addresses put in invite tokens; ``()`` means derive them from ``quic_listen``."""
    join: tuple[str, ...] = ()
    """Invite tokens of meshes to join (not decoded here)."""
    vram_gb: float | None = None
    """Override the detected VRAM (GB) this node offers; must be > 0."""

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.role not in ROLES:
            raise _fail("node.role", f"must be one of {', '.join(ROLES)} (got {self.role!r})")
        for i, addr in enumerate(self.advertise):
            if addr.port == 0:
                raise _fail(
                    f"node.advertise[{i}]", f"port 0 cannot be dialled; give the real port (got {addr})"
                )
            if addr.is_wildcard:
                raise _fail(
                    f"node.advertise[{i}]",
                    f"{addr.host} cannot be dialled; give an address peers can reach (got {addr})",
                )
        for i, token in enumerate(self.join):
            if not isinstance(token, str) or not token.strip():
                raise _fail(f"node.join[{i}]", "invite tokens must be non-empty strings")
        if self.vram_gb is not None:
            _positive("node.vram_gb", self.vram_gb)


@dataclass(frozen=True)
class ApiSection:
    """``[api]``: the OpenAI-compatible HTTP API."""

    listen: HostPort = HostPort("127.0.0.1", 9337)


@dataclass(frozen=True)
class ConsoleSection:
    """``[console]``: the web console."""

    listen: HostPort = HostPort("127.0.0.1", 3131)


@dataclass(frozen=True)
class ModelsSection:
    """``[models]``: what this node serves."""

    serve: tuple[str, ...] = ()
    """Model names this node loads (alone, or split across the mesh)."""
    force_split: bool = False
    """Split the served models across mesh workers even when they would fit on this node."""

    def __post_init__(self) -> None:
        for i, name in enumerate(self.serve):
            if not isinstance(name, str) or not name.strip():
                raise _fail(f"models.serve[{i}]", "model names must be non-empty strings")


@dataclass(frozen=True)
class LlamaSection:
    """``[llama]``: where the llama.cpp binaries are."""

    bin_dir: Path | None = None
    """Folder holding ``llama-server`` / ``rpc-server``; ``None`` = the built-in search."""
    threads: int | None = None
    """CPU threads for llama-server and rpc-server (``-t``); ``None`` = llama.cpp's default."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise _fail("llama.threads", f"must be at least 1 (got {self.threads})")


@dataclass(frozen=True)
class LogSection:
    """``[log]``: logging."""

    format: str = "json"
    """``json`` (one JSON object a line) or ``console`` (human readable)."""
    file: bool = False
    """Also write the log to ``<data_dir>/node.log``."""

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise _fail("log.format", f"must be one of {', '.join(LOG_FORMATS)} (got {self.format!r})")


@dataclass(frozen=True)
class TimingSection:
    """``[timing]``: mesh timing knobs, in seconds, all > 0."""

    gossip_interval_s: float = 2.0
    probe_interval_s: float = 1.0
    dead_after_s: float = 3.5
    """No successful probe for this long -> the peer is declared dead; must be > ``probe_interval_s``."""
    dead_ttl_s: float = 60.0
    """How long a dead node id is remembered."""
    route_refresh_s: float = 45.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _positive(f"timing.{f.name}", getattr(self, f.name))
        if self.dead_after_s <= self.probe_interval_s:
            raise _fail(
                "timing.dead_after_s",
                f"must be greater than timing.probe_interval_s "
                f"(got {self.dead_after_s} <= {self.probe_interval_s})",
            )


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """The whole ``node.toml``. Build variants with :meth:`with_node` or :func:`dataclasses.replace`."""

    node: NodeSection
    api: ApiSection = ApiSection()
    console: ConsoleSection = ConsoleSection()
    models: ModelsSection = ModelsSection()
    llama: LlamaSection = LlamaSection()
    log: LogSection = LogSection()
    timing: TimingSection = TimingSection()
    source: Path | None = None
    """The file this config was loaded from, if any."""

    def __post_init__(self) -> None:
        a, c = self.api.listen, self.console.listen
        if a.port != 0 and a.port == c.port and (a.host == c.host or a.is_wildcard or c.is_wildcard):
            raise _fail("console.listen", f"{c} clashes with api.listen {a}; use another port")

    def with_node(self, **changes: Any) -> NodeConfig:
        """A copy with ``[node]`` fields changed, e.g. ``cfg.with_node(name="b", role="client")``."""
        return dataclasses.replace(self, node=dataclasses.replace(self.node, **changes))


# --------------------------------------------------------------------------------------------- parsing

_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "api": ApiSection,
    "console": ConsoleSection,
    "models": ModelsSection,
    "llama": LlamaSection,
    "log": LogSection,
    "timing": TimingSection,
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
            raise _fail(section, f"expected a table [{section}] (got {_describe(raw)})")
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
        raise _fail(key, f"expected a string (got {_describe(value)})")
    return value


def _as_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, f"expected a boolean true/false (got {_describe(value)})")
    return value


def _as_float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(key, f"expected a number (got {_describe(value)})")
    return float(value)


def _as_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"expected a whole number (got {_describe(value)})")
    return value


def _as_positive_float(key: str, value: object) -> float:
    number = _as_float(key, value)
    _positive(key, number)
    return number


def _as_list(key: str, value: object, what: str) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        example = f'; write {key.rsplit(".", 1)[-1]} = ["..."]' if isinstance(value, str) else ""
        raise _fail(key, f"expected an array of {what} (got {_describe(value)}){example}")
    return list(value)


def _as_str_tuple(key: str, value: object) -> tuple[str, ...]:
    items = _as_list(key, value, "strings")
    out: list[str] = []
    for i, item in enumerate(items):
        item_key = f"{key}[{i}]"
        text = _as_str(item_key, item).strip()
        if not text:
            raise _fail(item_key, "must not be empty")
        out.append(text)
    return tuple(out)


def _as_hostport(key: str, value: object) -> HostPort:
    if not isinstance(value, str):
        raise _fail(key, f'expected a "host:port" string (got {_describe(value)})')
    return HostPort.parse(value, key)


def _as_hostport_tuple(key: str, value: object) -> tuple[HostPort, ...]:
    items = _as_list(key, value, '"host:port" strings')
    return tuple(_as_hostport(f"{key}[{i}]", item) for i, item in enumerate(items))


def _path_converter(base_dir: Path | None) -> Callable[[str, Any], Path]:
    def convert(key: str, value: object) -> Path:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise _fail(key, f"expected a path string (got {_describe(value)})")
        if not value.strip():
            raise _fail(key, "must not be empty")
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        return path

    return convert


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
        raise ConfigError(f"expected a table of sections (got {_describe(data)})")
    _check_top_level(data)
    tables = {name: _Table(name, data.get(name, {})) for name in _SECTIONS}
    to_path = _path_converter(base_dir)

    n = tables["node"]
    name = n.get("name", None, _as_str)
    if name is None:
        name = default_node_name()
    _check_name(name)
    node = NodeSection(
        name=name,
        role=n.get("role", "active", _as_str),
        data_dir=n.get("data_dir", default_data_dir(name), to_path),
        quic_listen=n.get("quic_listen", HostPort("0.0.0.0", 9338), _as_hostport),
        advertise=n.get("advertise", (), _as_hostport_tuple),
        join=n.get("join", (), _as_str_tuple),
        vram_gb=n.get("vram_gb", None, _as_positive_float),
    )

    api = ApiSection(listen=tables["api"].get("listen", ApiSection().listen, _as_hostport))
    console = ConsoleSection(listen=tables["console"].get("listen", ConsoleSection().listen, _as_hostport))

    m = tables["models"]
    models = ModelsSection(
        serve=m.get("serve", (), _as_str_tuple),
        force_split=m.get("force_split", False, _as_bool),
    )
    if node.role == "client" and models.serve:
        raise _fail(
            "models.serve",
            "a client node serves no models; remove models.serve or set node.role to active or standby",
        )

    llama = LlamaSection(
        bin_dir=tables["llama"].get("bin_dir", None, to_path),
        threads=tables["llama"].get("threads", None, _as_int),
    )

    lg = tables["log"]
    log = LogSection(format=lg.get("format", "json", _as_str), file=lg.get("file", False, _as_bool))

    t = tables["timing"]
    defaults = TimingSection()
    timing = TimingSection(
        **{key: t.get(key, getattr(defaults, key), _as_positive_float) for key in _SECTION_KEYS["timing"]}
    )

    return NodeConfig(
        node=node,
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


def default_config(**node_overrides: Any) -> NodeConfig:
    """The built-in config: a solo active node named ``meshllm`` serving ``smollm2-135m``.

    ``data_dir`` is ``~/.local/share/meshllm/default``. Keyword arguments replace :class:`NodeSection`
    fields (typed values: ``quic_listen=HostPort("127.0.0.1", 0)``, ``data_dir=tmp_path``). With
    ``role="client"`` nothing is served.
    """
    node = NodeSection(name="meshllm", data_dir=default_data_dir("default"))
    if node_overrides:
        node = dataclasses.replace(node, **node_overrides)
    serve: tuple[str, ...] = () if node.role == "client" else ("smollm2-135m",)
    return NodeConfig(node=node, models=ModelsSection(serve=serve))
