"""An asyncio event loop on its own thread, for the parts of a node that are asyncio code (the QUIC
transport, the HTTP servers) while the actors run on pykka threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopThread:
    """Owns one event loop running forever on a daemon thread until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let pending callbacks finish their cancellation before the loop is closed.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine from another thread and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop thread")
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


async def start_http(
    app: web.Application, host: str, port: int, limits: Mapping[str, int] | None = None
) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on host:port (0 picks a free port); returns the runner and the bound port.
    ``limits`` are aiohttp's request-parser caps (``max_headers``, ``max_field_size``, ...)."""
    parser: dict[str, Any] = dict(limits or {})
    runner = web.AppRunner(app, access_log=None, **parser)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    if not addresses:
        await runner.cleanup()
        raise OSError(f"no listening socket on {host}:{port}")
    bound: int = addresses[0][1]
    return runner, bound
