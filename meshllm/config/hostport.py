"""``host:port`` addresses as the config writes them, parsed strictly.

Listen, advertise and console addresses all share one parser so that every address key gives the same
error for the same mistake (a URL scheme, a missing port, IPv6 without brackets, a bad host name)
and ``str(HostPort.parse(text))`` round-trips. The rest of the package only calls :meth:`HostPort.parse`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from meshllm.config.errors import describe, fail

__all__ = ["HostPort"]

_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _check_host(host: str, key: str, text: str) -> None:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise fail(key, f"{host!r} is not a valid IPv6 address (got {text!r})") from None
        return
    if not _HOSTNAME_RE.fullmatch(host):
        raise fail(key, f"{host!r} is not a valid host name or IP address (got {text!r})")
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise fail(key, f"{host!r} is not a valid IPv4 address (got {text!r})") from None


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
            raise fail(key, f'expected a "host:port" string (got {describe(text)})')
        stripped = text.strip()
        if not stripped:
            raise fail(key, 'expected "host:port", e.g. "127.0.0.1:9337" (got an empty string)')
        if stripped.startswith("["):
            close = stripped.find("]")
            if close < 0:
                raise fail(key, f"missing ']' after the IPv6 address (got {text!r})")
            host, rest = stripped[1:close], stripped[close + 1 :]
            if not host:
                raise fail(key, f"missing host between '[' and ']' (got {text!r})")
            if ":" not in host:
                raise fail(key, f"brackets are only for IPv6 addresses (got {text!r})")
            if not rest.startswith(":"):
                raise fail(key, f'missing port: expected "[{host}]:PORT" (got {text!r})')
            port_text = rest[1:]
        else:
            if "://" in stripped:
                raise fail(
                    key, f'expected "host:port" without a URL scheme, e.g. "127.0.0.1:9337" (got {text!r})'
                )
            host, sep, port_text = stripped.rpartition(":")
            if not sep:
                raise fail(key, f'missing port: expected "host:port", e.g. "{stripped}:9337" (got {text!r})')
            if ":" in host:
                raise fail(key, f'IPv6 addresses need brackets, e.g. "[::1]:9000" (got {text!r})')
            if not host:
                raise fail(key, f'missing host: expected "host:port", e.g. "127.0.0.1{stripped}"')
        _check_host(host, key, text)
        if not port_text:
            raise fail(key, f"missing port after ':' (got {text!r})")
        if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
            raise fail(key, f"port must be a number 0..65535 (got {port_text!r} in {text!r})")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback IPs (127.0.0.0/8, ``::1``): only this machine can
        connect. Any other host name counts as reachable from elsewhere."""
        if self.host.rstrip(".").lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def is_wildcard(self) -> bool:
        """True for ``0.0.0.0`` / ``::`` (listen on every interface; not an address a peer can dial)."""
        return self.host in _WILDCARD_HOSTS
