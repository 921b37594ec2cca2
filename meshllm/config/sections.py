"""The typed sections of ``node.toml``, their defaults and their invariants.

Each ``[section]`` is a frozen dataclass whose fields are the keys a user may write, with the built-in
defaults. The dataclasses validate their own invariants (role names, positive timings, ...) in
``__post_init__``, so a config built in code or changed with :func:`dataclasses.replace` /
:meth:`NodeConfig.with_node` is checked too; type checking of raw TOML values is
:mod:`meshllm.config.loading`'s job. :func:`default_config` is the built-in configuration for a solo
node.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.config.errors import ConfigError, describe, fail
from meshllm.config.hostport import HostPort

__all__ = [
    "LOG_FORMATS",
    "ROLES",
    "ApiSection",
    "ConsoleSection",
    "LlamaSection",
    "LogSection",
    "ModelSettings",
    "ModelsSection",
    "NodeConfig",
    "NodeSection",
    "TimingSection",
    "check_name",
    "check_positive",
    "default_config",
    "default_data_dir",
    "default_node_name",
]

ROLES: tuple[str, ...] = ("active", "client", "standby")
LOG_FORMATS: tuple[str, ...] = ("json", "console")


def check_positive(key: str, value: float) -> None:
    """Raise a :class:`ConfigError` about ``key`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(key, f"expected a number (got {describe(value)})")
    if not math.isfinite(value) or value <= 0:
        raise fail(key, f"must be a number > 0 (got {value})")


def check_name(name: str, key: str = "node.name") -> None:
    """Raise a :class:`ConfigError` unless ``name`` is usable as a node name and a folder name."""
    if not isinstance(name, str):
        raise fail(key, f"expected a string (got {describe(name)})")
    if not name:
        raise fail(key, "must not be empty")
    if any(ch.isspace() for ch in name):
        raise fail(key, f"must not contain whitespace (got {name!r})")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise fail(key, f"must not contain path separators or be '.'/'..' (got {name!r})")
    if not name.isprintable():
        raise fail(key, f"must not contain control characters (got {name!r})")


def default_node_name() -> str:
    """The default ``node.name``: this machine's host name (``"meshllm"`` if it has none usable)."""
    name = socket.gethostname().strip()
    try:
        check_name(name)
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
    quic_listen: HostPort = HostPort("0.0.0.0", 9338)  # noqa: RUF009 (frozen, so sharing is safe)
    """UDP address for mesh (QUIC) traffic; port 0 picks a free port."""
    advertise: tuple[HostPort, ...] = ()
    """Addresses put in invite tokens; ``()`` means derive them from ``quic_listen``."""
    join: tuple[str, ...] = ()
    """Invite tokens of meshes to join (not decoded here)."""
    vram_gb: float | None = None
    """Override the detected VRAM (GB) this node offers; must be > 0."""

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.role not in ROLES:
            raise fail("node.role", f"must be one of {', '.join(ROLES)} (got {self.role!r})")
        for i, addr in enumerate(self.advertise):
            if addr.port == 0:
                raise fail(
                    f"node.advertise[{i}]", f"port 0 cannot be dialled; give the real port (got {addr})"
                )
            if addr.is_wildcard:
                raise fail(
                    f"node.advertise[{i}]",
                    f"{addr.host} cannot be dialled; give an address peers can reach (got {addr})",
                )
        for i, token in enumerate(self.join):
            if not isinstance(token, str) or not token.strip():
                raise fail(f"node.join[{i}]", "invite tokens must be non-empty strings")
        if self.vram_gb is not None:
            check_positive("node.vram_gb", self.vram_gb)


MIN_KEY_CHARS = 16


def check_exposure(section: str, listen: HostPort, api_keys: tuple[str, ...], open_: bool) -> None:
    """An HTTP server reachable from other machines needs keys, unless ``open`` says it is meant to
    be open; keys must be usable in an ``Authorization: Bearer`` header and not trivially guessed."""
    key = f"{section}.api_keys"
    if isinstance(api_keys, str) or not isinstance(api_keys, tuple | list):
        raise fail(key, f'expected an array of strings (got {describe(api_keys)}); write api_keys = ["..."]')
    for i, item in enumerate(api_keys):
        if not isinstance(item, str):
            raise fail(f"{key}[{i}]", f"expected a string (got {describe(item)})")
        if len(item) < MIN_KEY_CHARS:
            raise fail(
                f"{key}[{i}]",
                f"a key needs at least {MIN_KEY_CHARS} characters (e.g. the output of `openssl rand -hex 16`)",
            )
        if not item.isascii() or not item.isprintable() or any(ch.isspace() for ch in item):
            raise fail(f"{key}[{i}]", "a key must be printable ASCII without spaces")
    if not isinstance(open_, bool):
        raise fail(f"{section}.open", f"expected a boolean true/false (got {describe(open_)})")
    if open_ and api_keys:
        raise fail(
            f"{section}.open",
            f"open = true serves without keys, yet {key} lists some: remove one of the two",
        )
    if not listen.is_loopback and not api_keys and not open_:
        raise fail(
            key,
            f"{section}.listen {listen} is reachable from other machines: set {key} = [\"<key>\", ...] "
            f"(clients send Authorization: Bearer <key>), or {section}.open = true to serve it "
            "without keys on purpose",
        )


@dataclass(frozen=True)
class ApiSection:
    """``[api]``: the OpenAI-compatible HTTP API."""

    listen: HostPort = HostPort("127.0.0.1", 9337)  # noqa: RUF009 (frozen)
    api_keys: tuple[str, ...] = ()
    """Keys clients must send (``Authorization: Bearer <key>``); required when ``listen`` is not
    loopback, unless ``open``."""
    open: bool = False
    """Serve a non-loopback ``listen`` without keys, on purpose."""
    host_wait_s: float = 10.0
    """A request for a model the mesh knows but that has no host ready this instant (a host died or
    left and the table is being refreshed, a standby is promoting) waits up to this long for one
    before it is answered 503; nothing has been sent to the client yet, so waiting loses nothing."""

    def __post_init__(self) -> None:
        if self.host_wait_s < 0:
            raise fail("api.host_wait_s", f"must be 0 or more (got {self.host_wait_s})")
        check_exposure("api", self.listen, self.api_keys, self.open)
        object.__setattr__(self, "api_keys", tuple(self.api_keys))


@dataclass(frozen=True)
class ConsoleSection:
    """``[console]``: the web console."""

    listen: HostPort = HostPort("127.0.0.1", 3131)  # noqa: RUF009 (frozen)
    api_keys: tuple[str, ...] = ()
    """Keys a browser logs in with (``/?key=``, a cookie after) or a script sends as a Bearer
    header; required when ``listen`` is not loopback, unless ``open``."""
    open: bool = False
    """Serve a non-loopback ``listen`` without keys, on purpose."""

    def __post_init__(self) -> None:
        check_exposure("console", self.listen, self.api_keys, self.open)
        object.__setattr__(self, "api_keys", tuple(self.api_keys))


POOLINGS: tuple[str, ...] = ("mean", "cls", "last")
"""llama-server's ``--pooling`` types that give one vector per input, as ``/v1/embeddings`` needs."""


@dataclass(frozen=True)
class ModelSettings:
    """``[models.settings."<name>"]``: how this node starts one model's llama-server (``<name>`` as
    clients name it: a catalog name, a GGUF file's stem, a hub model's name)."""

    embeddings: bool = False
    """Serve ``/v1/embeddings`` for it (``--embeddings``)."""
    pooling: str | None = None
    """How token vectors become one embedding (``--pooling``): one of ``POOLINGS``. ``None``: the
    model's own, or ``mean`` for a GGUF that names none (a chat model used for embeddings)."""
    chat_template_file: Path | None = None
    """A Jinja chat template to use instead of the model's own (``--chat-template-file``), e.g. one
    that knows tool calls."""

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise fail("pooling", f"must be one of {', '.join(POOLINGS)} (got {self.pooling!r})")
        if self.pooling is not None and not self.embeddings:
            raise fail("pooling", "only applies with embeddings = true")


@dataclass(frozen=True)
class ModelsSection:
    """``[models]``: what this node serves."""

    serve: tuple[str, ...] = ()
    """Model names this node loads (alone, or split across the mesh)."""
    force_split: bool = False
    """Split the served models across mesh workers even when they would fit on this node."""
    context: int = 4096
    """Context size in tokens llama-server gets (``-c``) and the fit check counts the KV cache for;
    0 takes the model's own (often far larger) context length."""
    cache_dir: Path | None = None
    """Where downloaded models go; ``None``: huggingface_hub's cache (``HF_HUB_CACHE``/``HF_HOME``)."""
    settings: dict[str, ModelSettings] = dataclasses.field(default_factory=dict)
    """Per-model llama-server settings by model name (``[models.settings."<name>"]``)."""

    def __post_init__(self) -> None:
        for i, name in enumerate(self.serve):
            if not isinstance(name, str) or not name.strip():
                raise fail(f"models.serve[{i}]", "model names must be non-empty strings")
        if self.context < 0:
            raise fail(
                "models.context", f"must be 0 (the model's own) or a number of tokens (got {self.context})"
            )


@dataclass(frozen=True)
class LlamaSection:
    """``[llama]``: where the llama.cpp binaries are."""

    bin_dir: Path | None = None
    """Folder holding ``llama-server`` / ``rpc-server``; ``None`` = the built-in search."""
    threads: int | None = None
    """CPU threads for llama-server and rpc-server (``-t``); ``None`` = llama.cpp's default."""
    tensor_cache: bool = True
    """A split worker that has the model's GGUF fills llama.cpp's rpc-server tensor cache from it
    (``-c``), so the host sends a hash instead of each tensor over 10 MiB; false: every weight of the
    worker's share crosses the mesh at each load."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise fail("llama.threads", f"must be at least 1 (got {self.threads})")


@dataclass(frozen=True)
class LogSection:
    """``[log]``: logging."""

    format: str = "json"
    """``json`` (one JSON object a line) or ``console`` (human readable)."""
    file: bool = False
    """Also write the log to ``<data_dir>/node.log``."""

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise fail("log.format", f"must be one of {', '.join(LOG_FORMATS)} (got {self.format!r})")


def check_all_positive(section: str, values: Any) -> None:
    for f in dataclasses.fields(values):
        check_positive(f"{section}.{f.name}", getattr(values, f.name))


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
    drain_s: float = 30.0
    """On a graceful stop (SIGTERM), requests this node is answering get this long to finish; new ones
    are refused, so their requesters go to another host."""

    def __post_init__(self) -> None:
        check_all_positive("timing", self)
        if self.dead_after_s <= self.probe_interval_s:
            raise fail(
                "timing.dead_after_s",
                f"must be greater than timing.probe_interval_s "
                f"(got {self.dead_after_s} <= {self.probe_interval_s})",
            )


@dataclass(frozen=True)
class StandbySection:
    """``[standby]``: how a standby node takes over a model the mesh lost, and gives it back."""

    promote_window_s: float = 1.5
    """Standbys spread their promotions over this many seconds (weighted by capacity), so one takes each gap."""
    demote_after_s: float = 300.0
    """A promoted node steps back after being unneeded this long; no model cycles faster than this."""
    demand_ratio: float = 3.0
    """Promote for a served model whose requests per host reach this many times the mesh's average per node..."""
    demand_min_per_min: float = 10.0
    """...and at least this many requests a minute per host."""

    def __post_init__(self) -> None:
        check_all_positive("standby", self)


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
    standby: StandbySection = StandbySection()
    source: Path | None = None
    """The file this config was loaded from, if any."""

    def __post_init__(self) -> None:
        a, c = self.api.listen, self.console.listen
        if a.port != 0 and a.port == c.port and (a.host == c.host or a.is_wildcard or c.is_wildcard):
            raise fail("console.listen", f"{c} clashes with api.listen {a}; use another port")

    def with_node(self, **changes: Any) -> NodeConfig:
        """A copy with ``[node]`` fields changed, e.g. ``cfg.with_node(name="b", role="client")``."""
        return dataclasses.replace(self, node=dataclasses.replace(self.node, **changes))


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
