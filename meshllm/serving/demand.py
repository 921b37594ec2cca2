"""Requests per model per minute, as this node's gateway and tunnel server see them.

Every request is counted once, where it is served or refused: by the gateway that received it when
it answers it itself (its own llama-server, or no host for the model), and by the host's tunnel
server when it came through the mesh (from another node's gateway, a client's included). The counts
travel in the node's announcement and in the routing table; standbys promote on them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_S = 60.0


class DemandCounter:
    """Sliding one-minute counts per model; thread-safe (the data plane and the publisher share it)."""

    def __init__(self) -> None:
        self._now = time.monotonic
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, model: str) -> None:
        now = self._now()
        with self._lock:
            q = self._hits.setdefault(model, deque())
            q.append(now)
            self._trim(q, now)

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - WINDOW_S:
            q.popleft()

    def per_minute(self) -> dict[str, float]:
        """Requests in the last minute, per model that had any."""
        now = self._now()
        with self._lock:
            for q in self._hits.values():
                self._trim(q, now)
            return {m: float(len(q)) for m, q in self._hits.items() if q}
