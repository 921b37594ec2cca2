"""The OpenAI-compatible API every node serves on ``[api] listen``.

``GET /v1/models`` lists what the mesh serves, with each model's context length and size;
``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` are routed by their
``model`` field to this node's llama-server or through an HTTP tunnel to a host, streaming passed
through as it comes. Errors use OpenAI's JSON error shape. A host that fails before
the first response byte is skipped and the request tried on the next host of that model. Its routes and
caps are :mod:`meshllm.serving.openai_api`'s, which the host side of a tunnel enforces too. With
``[api] api_keys`` every request but ``/health`` needs ``Authorization: Bearer <key>``.

It runs on the transport's event loop, so tunnels are opened without crossing threads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pykka
from aiohttp import web
from aiohttp.typedefs import Middleware

from actors.base import AskError, Directory
from meshllm.logsetup import Logger
from meshllm.net.aio import start_http
from meshllm.net.body_pump import source_of
from meshllm.net.endpoint import MeshEndpoint
from meshllm.net.http_tunnel import CHUNK, UpstreamUnavailable, pass_headers
from meshllm.net.in_flight import InFlight
from meshllm.net.raw_http import (
    BadBody,
    UpstreamError,
    first_bytes,
    open_upstream,
)
from meshllm.net.spare_connection import SpareConnections
from meshllm.serving.api_keys import KeyCheck, bearer, unauthorized
from meshllm.serving.demand import DemandCounter
from meshllm.serving.openai_api import MAX_BODY_BYTES, PROXIED, SERVER_LIMITS, error_body, model_entry
from meshllm.serving.relay import relay
from meshllm.serving.request_log import RECORD, RequestRecord
from meshllm.serving.tunnel_requester import TunnelRequester
from meshllm.wire.messages import (
    HostFailed,
    HostInfo,
    ListModels,
    ModelList,
    Route,
    RouteReply,
    SetDemand,
)

DEMAND_EVERY_S = 10.0
ASK_TIMEOUT_S = 5.0
RETRY_AFTER_S = 5
HOST_POLL_S = 0.2
RECENTLY_KNOWN_S = 60.0
"""A model this gateway routed within this long is waited for (``host_wait_s``) when its last host
has just gone, instead of being answered 404 as one the mesh never had."""
OPEN_PATHS = ("/health",)
ReplyT = TypeVar("ReplyT", RouteReply, ModelList)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, **headers: str
) -> web.Response:
    return web.json_response(error_body(message, kind, code), status=status, headers=headers or None)


def require_key(keys: KeyCheck) -> Middleware:
    """A middleware that answers 401 to a request without one of ``keys`` (``/health`` stays open)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            presented = bearer(request.headers)
            if not keys.valid(presented):
                return unauthorized(presented)
        return await handler(request)

    return check


@web.middleware
async def errors_as_openai(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) in OpenAI's shape instead of plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        message = exc.text or exc.reason
        if exc.status == 413:
            message = f"request body over {MAX_BODY_BYTES} bytes"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 404:
            message = f"no route {request.path}"
        return openai_error(exc.status, message, kind)


class Target:
    """Where one attempt goes: this node's llama-server or a remote host."""

    def __init__(self, local_port: int = 0, host: HostInfo | None = None) -> None:
        self.local_port = local_port
        self.host = host

    def __str__(self) -> str:
        return f"local:{self.local_port}" if self.host is None else f"node:{self.host.node_id[:12]}"


class Gateway:
    """aiohttp server on the endpoint's loop."""

    def __init__(
        self,
        directory: Directory,
        endpoint: MeshEndpoint,
        host: str,
        port: int,
        logger: Logger,
        demand: DemandCounter | None = None,
        api_keys: tuple[str, ...] = (),
        host_wait_s: float = 0.0,
        spares: SpareConnections | None = None,
    ) -> None:
        self.directory = directory
        self.spares = spares
        self.host_wait_s = host_wait_s
        self.in_flight = InFlight()
        self._known: dict[str, float] = {}  # model -> when a route last knew it
        self.keys = KeyCheck(api_keys)
        self.demand = demand or DemandCounter()
        self._published: dict[str, float] = {}
        self._publisher: asyncio.Task[None] | None = None
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self.log = logger.bind(actor="gateway")
        self._runner: web.AppRunner | None = None
        self._turns: dict[str, itertools.count[int]] = {}
        self.tunnels = TunnelRequester(endpoint, self.log)

    # -- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> int:
        return self.endpoint.loop_thread.run(self._start(), timeout=10)

    async def _start(self) -> int:
        middlewares: list[Middleware] = [require_key(self.keys)] if self.keys.required else []
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[*middlewares, errors_as_openai])
        app.router.add_get("/v1/models", self.models)
        for method, path in PROXIED:
            app.router.add_route(method, path, self.proxy)
        app.router.add_get("/health", self.health)
        self._runner, self.port = await start_http(app, self.host, self.port, SERVER_LIMITS)
        if self.keys.required:
            self.log.info("gateway.api_keys", keys=self.keys.fingerprints)
        self._publisher = asyncio.ensure_future(self._publish_demand())
        return self.port

    async def _publish_demand(self) -> None:
        """Every few seconds, tell the actors that use demand what this node counted, when it changed."""
        while True:
            await asyncio.sleep(DEMAND_EVERY_S)
            self.publish_demand()

    def publish_demand(self) -> None:
        """Tell the registry and the router (and the standby, on a node that runs one) this node's
        demand, if it changed since the last time."""
        counts = self.demand.per_minute()
        if counts != self._published:
            self._published = counts
            message = SetDemand(demand=counts)
            self.directory.tell("registry", message)
            self.directory.tell("router", message)
            self.directory.tell_if_running("standby", message)

    def stop(self) -> None:
        async def stop() -> None:
            if self._publisher is not None:
                self._publisher.cancel()
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            self.endpoint.loop_thread.run(stop(), timeout=5)
        except Exception as exc:
            self.log.warning("gateway.stop_failed", reason=str(exc))

    # -- handlers -----------------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ask_router(self, msg: Route | ListModels, reply_type: type[ReplyT]) -> ReplyT | web.Response:
        """The router's answer, or an OpenAI-shaped 503 when it cannot give one."""
        try:
            return await self.directory.ask_async("router", msg, reply_type, ASK_TIMEOUT_S)
        except (AskError, pykka.Timeout) as exc:
            self.log.warning("gateway.router_unavailable", reason=str(exc) or type(exc).__name__)
            return openai_error(
                503, "the node's router is unavailable, try again", "server_error", code="router_unavailable"
            )

    async def _route(self, model: str) -> RouteReply | web.Response:
        """Where ``model`` is served: from the snapshot the Router published (an active node: no
        thread hop per request), else the router's answer (a passive node's), else a 503."""
        reply = self.endpoint.route_now(model)
        if reply is not None:
            return reply
        return await self._ask_router(Route(model=model), RouteReply)

    async def models(self, request: web.Request) -> web.Response:
        listed = self.endpoint.models_now()  # an active node's router published it; else ask
        reply = listed if listed is not None else await self._ask_router(ListModels(), ModelList)
        if isinstance(reply, web.Response):
            return reply
        now = int(time.time())
        for name in reply.served:
            self._known[name] = time.monotonic()
        details = {m.name: m for m in reply.details}
        data = [
            model_entry(name, now, details[name].size_bytes, details[name].context_length)
            if name in details
            else model_entry(name, now)
            for name in reply.served
        ]
        return web.json_response({"object": "list", "data": data})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        # Status 500 unless it answers: an exception becomes errors_as_openai's 500.
        record = RequestRecord(path=request.path, started=time.monotonic(), status=500)
        request[RECORD] = record
        try:
            with self.in_flight.track():  # a graceful stop waits for it (Node.stop, [timing] drain_s)
                response = await self._proxy(request)
            record.status = response.status
            return response
        except web.HTTPException as exc:
            record.status = exc.status  # aiohttp's own refusals (a body over the cap: 413)
            raise
        finally:
            self.log.info("gateway.served", **record.fields())

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            return openai_error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(parsed, dict):
            return openai_error(400, "request body must be a JSON object", "invalid_request_error")
        model = parsed.get("model")
        if not isinstance(model, str) or not model:
            return openai_error(
                400, "missing 'model' (a string)", "invalid_request_error", code="missing_model"
            )
        request[RECORD].model = model
        route = await self._route(model)
        if isinstance(route, web.Response):
            return route
        if route.known:
            self._known[model] = time.monotonic()
        elif time.monotonic() - self._known.get(model, -RECENTLY_KNOWN_S) >= RECENTLY_KNOWN_S:
            self.demand.hit(model)  # asked for, and nobody serves it: demand a standby may answer
            available = ", ".join(route.available) or "none"
            return openai_error(
                404,
                f"model {model!r} does not exist in this mesh; available: {available}",
                "invalid_request_error",
                code="model_not_found",
            )
        targets = self._targets(route)
        if not targets:
            self.demand.hit(model)
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        deadline = time.monotonic() + self.host_wait_s
        tried: set[str] = set()
        while True:
            for target in targets:
                tried.add(str(target))
                try:
                    return await self._forward(request, target, model, headers, body)
                except UpstreamUnavailable as exc:
                    self.log.warning("gateway.retry", model=model, target=str(target), reason=str(exc))
                    if target.host is not None:
                        self.directory.tell("router", HostFailed(model=model, node_id=target.host.node_id))
            # Nothing has reached the client yet: wait for a host we have not tried (a refreshed table,
            # a restart, a promotion) rather than fail at once.
            waited = await self._wait_for_host(model, tried, deadline)
            if isinstance(waited, web.Response):
                return waited
            if not waited:
                break
            targets = waited
        if not tried:
            return openai_error(
                503,
                f"model {model!r} has no host ready yet",
                "server_error",
                code="model_not_ready",
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        return openai_error(
            503,
            f"every host of {model!r} failed",
            "server_error",
            code="hosts_failed",
            **{"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _wait_for_host(self, model: str, tried: set[str], deadline: float) -> list[Target] | web.Response:
        """Ask the router again until the model has a host not yet tried or ``deadline`` has passed (the
        router refreshes a table that has none; a new host, a promotion, a restart fill it)."""
        while time.monotonic() < deadline:
            await asyncio.sleep(HOST_POLL_S)
            route = await self._route(model)
            if isinstance(route, web.Response):
                return route
            targets = [t for t in self._targets(route) if str(t) not in tried]
            if targets:
                self.log.info("gateway.host_waited", model=model, target=str(targets[0]))
                return targets
        return []

    def _targets(self, route: RouteReply) -> list[Target]:
        """Every host of the model, rotated per request so load spreads across them."""
        targets = [Target(local_port=route.local_port)] if route.local_port else []
        targets += [Target(host=h) for h in route.hosts if h.node_id != self.endpoint.node_id]
        if len(targets) > 1 and route.spread:
            turn = next(self._turns.setdefault(route.model, itertools.count())) % len(targets)
            targets = targets[turn:] + targets[:turn]
        return targets

    async def _forward(
        self, request: web.Request, target: Target, model: str, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        record = request[RECORD]  # proxy() made it
        if target.host is not None:
            record.tried(str(target), "")  # the tunnel says which transport when it has one
            return await self.tunnels.forward(request, target.host, model, headers, body)
        record.tried(str(target), "local")
        self.demand.hit(model)
        try:
            upstream = await open_upstream(
                target.local_port, request.method, request.path, headers, body, spares=self.spares
            )
        except UpstreamError as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        try:
            read = upstream.reader.read
            try:
                first = await first_bytes(upstream.body, upstream.first, lambda: read(CHUNK))
            except (ConnectionError, OSError, BadBody) as exc:
                raise UpstreamUnavailable(f"llama-server broke off before its first byte: {exc}") from exc
            if not first and upstream.status == 200:
                raise UpstreamUnavailable("llama-server ended its answer before its first byte")
            response, _ = await relay(
                request,
                upstream.status,
                pass_headers(upstream.headers),
                upstream.body,
                first,
                lambda: read(CHUNK),
                upstream.close,  # the connection closes: llama-server stops generating
                self.log,
                model,
                str(target),
                pump_from=(upstream.reader, source_of(upstream.writer)),
            )
            return response
        finally:
            upstream.close()
