"""The node's console HTTP server: the page a person keeps open while running a mesh (``/``, from the
files in ``static/``), ``GET /api/status`` (the node, the active peers it knows, its models and the
timeline, as JSON), ``GET /api/events`` (the same status as server-sent events, pushed on every change)
and a relay of the chat panel's calls to this node's OpenAI API. It runs on its own loop thread and
asks the actors for the view."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykka
from aiohttp import web

from actors.base import AskError, Directory
from meshllm.console.auth import ConsoleAuth
from meshllm.console.feed import StatusFeed
from meshllm.console.proxy import ApiProxy, api_urls
from meshllm.console.timeline import Timeline
from meshllm.logsetup import Logger
from meshllm.net.aio import LoopThread, start_http
from meshllm.wire.messages import (
    DownloadsReply,
    DownloadStatus,
    GetDownloads,
    GetPlan,
    GetRouteTable,
    GetStandby,
    GetStatus,
    GetTransportStats,
    ModelStatus,
    PlanReply,
    RouteTable,
    StandbyReply,
    StatusReply,
    TransportStats,
)

ASK_TIMEOUT_S = 5.0
STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0
CHECK_S = 1.0  # how often an idle event stream looks whether its client went away


def status_json(
    status: StatusReply,
    transport: TransportStats | None,
    models: tuple[ModelStatus, ...],
    extra: dict[str, Any],
    downloads: tuple[DownloadStatus, ...] = (),
    demand: dict[str, float] | None = None,
) -> dict[str, Any]:
    body = dataclasses.asdict(status)
    jobs = {d.model: dataclasses.asdict(d) for d in downloads}
    demand = demand or {}
    body["models"] = [
        {**dataclasses.asdict(m), "download": jobs.get(m.name), "demand_per_min": demand.get(m.name, 0.0)}
        for m in models
    ]
    body.update(extra)
    if transport is not None:
        body["connections"] = transport.connections
        body["passive_connections"] = transport.passive_connections
        body["standby_connections"] = transport.standby_connections
        body["rpc_bytes"] = {
            "to_workers": transport.rpc_bytes_to_workers,
            "from_workers": transport.rpc_bytes_from_workers,
            "served_in": transport.rpc_bytes_served_in,
            "served_out": transport.rpc_bytes_served_out,
        }
    return body


class ConsoleServer:
    """aiohttp app on a loop thread; ``port`` is known after :meth:`start`.

    ``timeline`` is the node's (it outlives this server across a role change); ``api_address`` says
    where the node's gateway listens, once it does; ``api_keys`` are the console's own keys (none: open,
    the loopback default) and ``gateway_key`` the key its chat relay sends the gateway, if that needs one."""

    def __init__(
        self,
        directory: Directory,
        host: str,
        port: int,
        extra: Callable[[], dict[str, Any]],
        status_from: str = "registry",
        plan_from: str = "election",
        timeline: Timeline | None = None,
        api_address: Callable[[], tuple[str, int] | None] = lambda: None,
        api_keys: tuple[str, ...] = (),
        gateway_key: str | None = None,
        logger: Logger | None = None,
    ) -> None:
        self.directory = directory
        self.status_from = status_from  # the actor that answers GetStatus (a passive node's router)
        self.plan_from = plan_from
        self.host = host
        self.port = port
        self._extra = extra
        self._timeline = timeline
        self._api_address = api_address
        self._thread = LoopThread("console")
        self._runner: web.AppRunner | None = None
        self._proxy = ApiProxy(api_address, gateway_key)
        self._auth = ConsoleAuth(api_keys)
        self._log = logger.bind(actor="console") if logger is not None else None
        self._feed = StatusFeed(self._thread.loop, self._snapshot)

    def start(self) -> int:
        return self._thread.run(self._start(), timeout=10)

    async def _start(self) -> int:
        app = web.Application(middlewares=[self._auth.middleware] if self._auth.required else [])
        if self._auth.required:
            app.router.add_post("/login", self._auth.login)
            if self._log is not None:
                self._log.info("console.api_keys", keys=self._auth.keys.fingerprints)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        self._proxy.add_routes(app)
        app.on_shutdown.append(self._on_shutdown)
        await self._proxy.open()
        self._runner, self.port = await start_http(app, self.host, self.port)
        if self._timeline is not None:
            self._timeline.on_change = self._feed.wake
        return self.port

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _status(self, request: web.Request) -> web.Response:
        body = await self._snapshot()
        if body is None:
            return web.json_response({"error": "status unavailable"}, status=503)
        return web.json_response(body)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the status at once, then again on every change; a comment every
        :data:`KEEPALIVE_S` seconds. Ends when the client goes away or the node stops."""
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        feed = self._feed
        try:
            await resp.write(b"retry: 1000\n\n")  # reconnect within a second when the node is back
            with feed.subscription():
                seen = feed.first_seen()
                quiet_since = time.monotonic()
                while not feed.closed:
                    if await feed.next(seen, CHECK_S) and feed.text:
                        seen = feed.version
                        await resp.write(f"data: {feed.text}\n\n".encode())
                        quiet_since = time.monotonic()
                    elif request.transport is None or request.transport.is_closing():
                        break
                    elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                        await resp.write(b": keep-alive\n\n")
                        quiet_since = time.monotonic()
        except ConnectionResetError:
            pass  # the client went away mid-write
        return resp

    async def _on_shutdown(self, app: web.Application) -> None:
        self._feed.close()

    async def _snapshot(self) -> dict[str, Any] | None:
        """The status body, or ``None`` when the actor that answers status cannot."""
        try:
            status = await self.directory.ask_async(self.status_from, GetStatus(), StatusReply, ASK_TIMEOUT_S)
        except (AskError, pykka.Timeout):  # an actor that is stopping or stuck
            return None
        stats: TransportStats | None = None
        models: tuple[ModelStatus, ...] = ()
        # The registry's view is the status; the rest completes it when it can be had.
        with contextlib.suppress(AskError, pykka.Timeout):
            stats = await self.directory.ask_async(
                "transport", GetTransportStats(), TransportStats, ASK_TIMEOUT_S
            )
        with contextlib.suppress(AskError, pykka.Timeout):
            models = (
                await self.directory.ask_async(self.plan_from, GetPlan(), PlanReply, ASK_TIMEOUT_S)
            ).models
        downloads: tuple[DownloadStatus, ...] = ()
        if self.directory.ref("downloader") is not None:
            with contextlib.suppress(AskError, pykka.Timeout):
                reply = await self.directory.ask_async(
                    "downloader", GetDownloads(), DownloadsReply, ASK_TIMEOUT_S
                )
                downloads = reply.jobs
        demand: dict[str, float] = {}
        with contextlib.suppress(AskError, pykka.Timeout):
            demand = (
                await self.directory.ask_async("router", GetRouteTable(), RouteTable, ASK_TIMEOUT_S)
            ).demand
        body = status_json(status, stats, models, self._extra(), downloads, demand)
        if self.directory.ref("standby") is not None:
            with contextlib.suppress(AskError, pykka.Timeout):
                standby = await self.directory.ask_async("standby", GetStandby(), StandbyReply, ASK_TIMEOUT_S)
                body["standby"] = dataclasses.asdict(standby)
        body["api_url"] = api_urls(self._api_address())[0]
        body["timeline"] = self._timeline.entries() if self._timeline is not None else []
        return body

    def stop(self) -> None:
        if self._timeline is not None and self._timeline.on_change == self._feed.wake:
            self._timeline.on_change = None

        async def stop() -> None:
            self._feed.close()  # event streams end before the server waits for its handlers
            if self._runner is not None:
                await self._runner.cleanup()
            await self._proxy.close()

        try:
            self._thread.run(stop(), timeout=5)
        except Exception:
            pass
        self._thread.stop()
