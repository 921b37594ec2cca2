"""The status feed behind ``GET /api/events``: one poller per console, running only while someone
subscribes, that asks the actors for the status at most every :data:`POLL_S` seconds and publishes
it only when it changed.

What counts as a change is :func:`change_key`, a pure function: the status without the counters that
move on every poll (a peer's ``last_seen_s``, the RPC byte counters) and with each GPU's free memory
rounded, so an idle mesh pushes nothing and a page sees every join, death, plan or download step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

POLL_S = 0.5
GPU_FREE_STEP = 1 << 26  # 64 MiB: what llama.cpp's allocations move; finer jitter is not a change
VOLATILE_TOP = ("rpc_bytes",)
VOLATILE_PEER = ("last_seen_s",)


def change_key(body: dict[str, Any]) -> str:
    """``body`` as canonical JSON without its volatile counters: equal keys, nothing to push."""
    stable = {k: v for k, v in body.items() if k not in VOLATILE_TOP}
    peers = body.get("peers")
    if isinstance(peers, list):
        stable["peers"] = [
            {k: v for k, v in p.items() if k not in VOLATILE_PEER} if isinstance(p, dict) else p
            for p in peers
        ]
    gpus = body.get("gpus")
    if isinstance(gpus, list):
        stable["gpus"] = [
            {**g, "free_bytes": g["free_bytes"] // GPU_FREE_STEP}
            if isinstance(g, dict) and isinstance(g.get("free_bytes"), int)
            else g
            for g in gpus
        ]
    return json.dumps(stable, sort_keys=True, default=str)


class StatusFeed:
    """Polls ``produce`` while it has subscribers; subscribers wait for the next version.

    Lives on the console's event loop; :meth:`wake` may be called from any thread (the timeline's
    log tap), and makes the next poll happen at once instead of at the next tick."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        produce: Callable[[], Awaitable[dict[str, Any] | None]],
        poll_s: float = POLL_S,
    ) -> None:
        self._loop = loop
        self._produce = produce
        self._poll_s = poll_s
        self._subscribers = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._key = ""
        self.version = 0
        self.text = ""  # the latest status as JSON; "" before the first poll
        self.closed = False

    @contextlib.contextmanager
    def subscription(self) -> Iterator[None]:
        """Count a subscriber for the duration; the first one starts the poller."""
        self._subscribers += 1
        if self._task is None or self._task.done():
            # Nobody watched since the last poll: what the feed holds may be stale, start afresh.
            self._key, self.text = "", ""
            self._task = asyncio.ensure_future(self._poll())
        try:
            yield
        finally:
            self._subscribers -= 1
            if self._subscribers == 0 and self._task is not None:
                self._task.cancel()
                self._task = None

    def first_seen(self) -> int:
        """The ``seen`` a new subscriber starts from: the current status if there is one."""
        return self.version - 1 if self.text else self.version

    async def next(self, seen: int, timeout: float) -> bool:
        """Wait until there is a version newer than ``seen`` (True) or ``timeout`` passes or the feed
        closes (False)."""
        if self.version > seen:
            return True
        if self.closed:
            return False
        changed = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
        return self.version > seen

    def wake(self) -> None:
        """Poll now (thread-safe)."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            self._loop.call_soon_threadsafe(self._wake.set)

    def close(self) -> None:
        """End every subscriber's wait (node shutdown); on the loop's thread."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._publish_event()

    def _publish_event(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _poll(self) -> None:
        while not self.closed:
            self._wake.clear()
            try:
                body = await self._produce()
            except Exception:
                body = None  # an odd reply must not end the feed; the next tick tries again
            if body is not None:
                key = change_key(body)
                if key != self._key:
                    self._key = key
                    self.text = json.dumps(body, default=str)
                    self.version += 1
                    self._publish_event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
