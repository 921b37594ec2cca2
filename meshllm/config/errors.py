"""The one error type of the config package, and the helpers that word its messages.

Every module of the package (address parsing, the sections' own invariants, TOML loading) reports a
problem the same way: a :class:`ConfigError` whose message starts with the dotted key and names the raw
value in TOML terms, so the helpers live here, below all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ConfigError", "describe", "fail"]


class ConfigError(ValueError):
    """A config problem; the message names the offending key.

    Example: ``node.role: must be one of active, client, standby (got 'x')``. ``key`` holds the dotted key
    (``"node.role"``) when the problem is about one key, else ``None`` (e.g. a file that cannot be read).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def fail(key: str, message: str) -> ConfigError:
    """A :class:`ConfigError` about ``key``, its message prefixed with the key (the caller raises it)."""
    return ConfigError(f"{key}: {message}", key=key)


def describe(value: object) -> str:
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
