"""Work under way on one event loop, counted so that a graceful stop can wait for it to finish.

The tunnel host counts the answers it streams for other nodes, the gateway the requests it answers
for this node's own clients; ``Node.stop`` waits for both (``[timing] drain_s``) before llama-server
goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class InFlight:
    """A count of requests under way and an event that is set whenever it is zero."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> int:
        """Wait until nothing is under way or ``timeout_s`` has passed; returns what is still running."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self.count
