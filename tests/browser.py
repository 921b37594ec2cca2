"""Test helpers for the console page: headless Chromium through Selenium, and a fake console that
serves the page's real files with statuses a test makes up (hundreds of nodes, odd fields).

Chromium comes from ``scripts/install-browser.sh`` (Debian's ``chromium`` and ``chromium-driver``);
without them the browser tests fail, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from meshllm.console.server import STATIC
from meshllm.net.aio import LoopThread, start_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Without the background-networking flags Chromium keeps dialling Google and floods refused connections.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def have_browser() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def start_browser(profile: Path) -> Any:
    """A headless Chromium with its own profile that keeps the page's console log for the test."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def severe_logs(driver: Any) -> list[dict[str, Any]]:
    """The page's JavaScript errors (and failed loads) since the last call."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


class FakeConsole:
    """The console's page and files, with ``/api/events`` sending the given statuses in order and
    then holding the stream open; ``/api/status`` answers the last one; ``/v1/models`` is empty."""

    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        self.statuses = statuses
        self._thread = LoopThread("fake-console")
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self.url = ""

    def start(self) -> FakeConsole:
        self.url = f"http://127.0.0.1:{self._thread.run(self._start(), timeout=10)}"
        return self

    async def _start(self) -> int:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/v1/models", self._models)
        self._runner, port = await start_http(app, "127.0.0.1", 0)
        return port

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.statuses[-1])

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for status in self.statuses:
            await resp.write(f"data: {json.dumps(status)}\n\n".encode())
        assert self._closing is not None
        await self._closing.wait()
        return resp

    def stop(self) -> None:
        async def stop() -> None:
            if self._closing is not None:
                self._closing.set()
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            self._thread.run(stop(), timeout=10)
        finally:
            self._thread.stop()


@contextlib.contextmanager
def fake_console(statuses: list[dict[str, Any]]) -> Iterator[FakeConsole]:
    server = FakeConsole(statuses).start()
    try:
        yield server
    finally:
        server.stop()

