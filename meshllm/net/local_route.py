"""Where a tunnel that arrived for a model goes on this node: the router's loopback ports."""

from __future__ import annotations

from collections.abc import Callable

import pykka

from actors.base import AskError, Directory
from meshllm.logsetup import Logger
from meshllm.wire.messages import Route, RouteReply

ROUTE_TIMEOUT_S = 5.0

RouteNow = Callable[[str], RouteReply | None]
"""The router's answer from the snapshot it published (:meth:`MeshEndpoint.route_now`), or None when
there is none to answer from and the router must be asked."""


async def local_route(
    directory: Directory, model: str, log: Logger, route_now: RouteNow | None = None
) -> RouteReply | None:
    """The router's answer for ``model`` (from its published snapshot when there is one, else asked);
    None (logged) when the router cannot answer, which the tunnel treats as "not served here"."""
    if route_now is not None and (reply := route_now(model)) is not None:
        return reply
    try:
        return await directory.ask_async("router", Route(model=model), RouteReply, ROUTE_TIMEOUT_S)
    except (AskError, pykka.Timeout) as exc:
        log.warning("tunnel.router_unavailable", model=model, reason=str(exc) or type(exc).__name__)
        return None
