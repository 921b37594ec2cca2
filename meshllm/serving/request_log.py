"""One log line per API request: the node's access log.

An operator who reads a node's log must be able to see each request it took and what became of it:
which model, which host answered (this node's llama-server or another node over which tunnel), how
long the client waited for the first byte of the answer and for all of it, and how it ended (whole,
the client gone, the host lost mid-answer). The gateway logs ``gateway.served`` for every request
to a proxied route, and a host logs ``tunnel.served`` for every request another node tunnelled to it,
so a slow or cut answer can be followed from the node that took it to the node that generated it.

A :class:`RequestRecord` is filled in as the request goes and logged once when it ends; nothing is
logged before, so the line costs the answer nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

WHOLE = "whole"
CLIENT_LEFT = "client_left"
HOST_LOST = "host_lost"
REQUESTER_LEFT = "requester_left"
LLAMA_BROKE = "llama_broke"
REFUSED = "refused"
ERROR = "error"
"""How an answer ended. At the gateway: whole, its client gone, or its host lost mid-answer. At a host
serving a tunnelled request: whole, the requesting node gone, llama-server broken off mid-answer, or
the request sent back before any answer (the requester tries another host). At either: an error
answer of the node's own, nothing relayed (its status says which)."""


@dataclass
class RequestRecord:
    """What one request did, gathered while it runs."""

    path: str
    started: float  # time.monotonic()
    model: str = ""
    target: str = ""
    """Where the answer came from: ``local:<port>`` or ``node:<id prefix>`` (the gateway's naming in
    ``gateway.retry``)."""
    via: str = ""
    """``local``, ``fast`` (TLS over TCP) or ``quic``: how the request reached its llama-server."""
    tries: int = 0
    status: int | None = None
    """The HTTP status answered; None while (or if) none was."""
    first_byte_at: float | None = None
    end: str = ""

    def tried(self, target: str, via: str) -> None:
        self.tries += 1
        self.target = target
        self.via = via

    def first_byte(self) -> None:
        """The answer's first bytes went out (to the client, or on the tunnel) just now."""
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()

    def fields(self, now: float | None = None) -> dict[str, Any]:
        """The log line's fields."""
        now = time.monotonic() if now is None else now
        status = self.status
        out: dict[str, Any] = {"path": self.path[:200]}
        if self.model:
            out["model"] = self.model[:100]
        if status is not None:
            out["status"] = status
        if self.target:
            out["target"] = self.target
        if self.via:
            out["via"] = self.via
        if self.tries > 1:
            out["tries"] = self.tries
        if self.first_byte_at is not None:
            out["first_byte_ms"] = round((self.first_byte_at - self.started) * 1e3, 1)
        out["ms"] = round((now - self.started) * 1e3, 1)
        out["end"] = self.end or (WHOLE if status is not None and status < 400 else ERROR)
        return out


RECORD = web.RequestKey("meshllm.request_record", RequestRecord)
"""The key of a gateway request's :class:`RequestRecord` in its ``web.Request``."""
