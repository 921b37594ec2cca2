"""Node configuration: parse and validate ``node.toml``.

A meshllm node is configured by one TOML file (see ``config/*.toml`` for commented examples). This package
turns that file into frozen dataclasses and rejects anything it does not understand *before* the node
starts: a typo such as ``nmae = "a"`` or ``port = "9337"`` should stop the node with a message that names
the key (``node.nmae``), says what was expected, and suggests the likely fix, instead of being silently
ignored or failing later somewhere far from the file.

Every section and every key is optional; :func:`default_config` is the built-in configuration for a solo
node. Errors are :class:`ConfigError` (a ``ValueError``) whose message starts with the dotted key, e.g.
``node.role: must be one of active, client, standby (got 'x')``.

The package is split by reason; import from here, not from the modules:

- :mod:`~meshllm.config.errors`: :class:`ConfigError` and the wording of its messages;
- :mod:`~meshllm.config.hostport`: :class:`HostPort`, the strict ``host:port`` parser;
- :mod:`~meshllm.config.sections`: the typed sections, their defaults and invariants, :func:`default_config`;
- :mod:`~meshllm.config.loading`: raw TOML to :class:`NodeConfig` (:func:`parse_config`, :func:`load_config`)
  with the "unknown key, did you mean" errors.
"""

from __future__ import annotations

from meshllm.config.errors import ConfigError
from meshllm.config.hostport import HostPort
from meshllm.config.loading import load_config, parse_config
from meshllm.config.sections import (
    LOG_FORMATS,
    ROLES,
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
    default_config,
    default_data_dir,
    default_node_name,
)

__all__ = [
    "LOG_FORMATS",
    "ROLES",
    "ApiSection",
    "ConfigError",
    "ConsoleSection",
    "HostPort",
    "LlamaSection",
    "LogSection",
    "ModelSettings",
    "ModelsSection",
    "NodeConfig",
    "NodeSection",
    "StandbySection",
    "TimingSection",
    "default_config",
    "default_data_dir",
    "default_node_name",
    "load_config",
    "parse_config",
]
