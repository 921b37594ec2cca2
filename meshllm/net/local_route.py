"""Where a tunnel that arrived for a model goes on this node: the router's loopback ports."""

from __future__ import annotations

import pykka

from actors.base import AskError, Directory
from meshllm.logsetup import Logger
from meshllm.wire.messages import Route, RouteReply

ROUTE_TIMEOUT_S = 5.0


async def local_route(directory: Directory, model: str, log: Logger) -> RouteReply | None:
    """The router's answer for ``model``; None (logged) when the router cannot answer, which the
    tunnel treats as "not served here"."""
    try:
        return await directory.ask_async("router", Route(model=model), RouteReply, ROUTE_TIMEOUT_S)
    except (AskError, pykka.Timeout) as exc:
        log.warning("tunnel.router_unavailable", model=model, reason=str(exc) or type(exc).__name__)
        return None
