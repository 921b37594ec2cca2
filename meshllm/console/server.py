"""The node's console HTTP server. For now it serves ``GET /api/status``: the node and the active
peers it knows, as JSON. It runs on its own loop thread and asks the registry for the view."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import pykka
from aiohttp import web

from actors.base import AskError, Directory
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
    """aiohttp app on a loop thread; ``port`` is known after :meth:`start`."""

    def __init__(
        self,
        directory: Directory,
        host: str,
        port: int,
        extra: Callable[[], dict[str, Any]],
        status_from: str = "registry",
        plan_from: str = "election",
    ) -> None:
        self.directory = directory
        self.status_from = status_from  # the actor that answers GetStatus (a passive node's router)
        self.plan_from = plan_from
        self.host = host
        self.port = port
        self._extra = extra
        self._thread = LoopThread("console")
        self._runner: web.AppRunner | None = None

    def start(self) -> int:
        return self._thread.run(self._start(), timeout=10)

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_get("/api/status", self._status)
        self._runner, self.port = await start_http(app, self.host, self.port)
        return self.port

    async def _status(self, request: web.Request) -> web.Response:
        try:
            status = await self.directory.ask_async(self.status_from, GetStatus(), StatusReply, ASK_TIMEOUT_S)
        except (AskError, pykka.Timeout) as exc:  # an actor that is stopping or stuck
            return web.json_response({"error": f"status unavailable: {exc}"}, status=503)
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
        return web.json_response(body)

    def stop(self) -> None:
        if self._runner is not None:
            try:
                self._thread.run(self._runner.cleanup(), timeout=5)
            except Exception:
                pass
        self._thread.stop()
