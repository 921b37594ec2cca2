"""One listener's guard before admission: the pure limiter of :mod:`meshllm.net.preauth` on the
listener's event loop clock, plus the counts and the throttled log lines an operator sees.

Why a separate piece: both listeners (QUIC, fast path) need the same three things - count a
connection in and out, say why one was closed before it authenticated, and never let a flood of such
closures flood the log - and the limiter itself stays free of clocks and loggers so its rules are unit
tested on their own.

Log events (at most :data:`~meshllm.net.preauth.LOG_BURST` lines per
:data:`~meshllm.net.preauth.LOG_INTERVAL_S` per listener, each with the running ``counts`` and how
many lines were ``held_back`` before it; when lines were held back, one ``preauth.summary`` follows
at the end of the window so the final counts always reach the log):

- ``preauth.closed``: a connection closed before it authenticated; ``why`` is one of
  ``refused`` (queues full), ``queue_expired``, ``deadline`` (no verified Hello in time), ``gone``
  (the peer closed first), ``not_created`` (aioquic made no connection of an admitted packet);
- ``stream.rejected`` (``why=garbage``: TLS or framing errors, oversized frames, too many bytes) and
  ``auth.refused`` (``why=bad_hello``): the events authenticated connections log too, with
  ``listener`` and ``counts``, under a second throttle with a larger budget.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from meshllm.logsetup import Logger
from meshllm.net.preauth import (
    AUTH_DEADLINE_S,
    LOG_BURST,
    Limits,
    LogThrottle,
    PreAuthLimiter,
    Verdict,
)

T = TypeVar("T")


class PreAuthGuard(Generic[T]):
    """The limiter, clock, counts and throttled log of one listener (``name``: "quic" or "fast")."""

    def __init__(
        self,
        name: str,
        log: Logger,
        loop: asyncio.AbstractEventLoop,
        limits: Limits | None = None,
        on_expire: Callable[[T], None] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.loop = loop
        self.deadline_s = AUTH_DEADLINE_S
        self.on_expire = on_expire
        self.limiter: PreAuthLimiter[T] = PreAuthLimiter(limits, on_expire=self._expired)
        self.closed: Counter[str] = Counter()
        self._throttle = LogThrottle()
        self._refusals = LogThrottle(burst=4 * LOG_BURST)  # auth.refused, stream.rejected: rarer
        self._summary: asyncio.TimerHandle | None = None
        self._logged: dict[str, int] = {}  # the counts the last line carried

    # -- counting -----------------------------------------------------------------------------------------

    def arrive(self, source: str, ticket: T) -> Verdict:
        verdict = self.limiter.arrive(source, ticket, self.loop.time())
        if verdict is Verdict.REFUSE:
            self.note("refused", source)
        return verdict

    def release(self, source: str) -> list[T]:
        """Give a slot back (authenticated or closed); the queued tickets admitted in its place."""
        admitted = self.limiter.release(source, self.loop.time())
        if self._logged.get("held") and self._summary is None:  # the log last showed slots held
            self._summary = self.loop.call_later(self._throttle.interval_s, self._flush)
        return admitted

    def withdraw(self, source: str, ticket: T) -> bool:
        return self.limiter.withdraw(source, ticket)

    def _expired(self, ticket: T) -> None:
        self.note("queue_expired", None)
        if self.on_expire is not None:
            self.on_expire(ticket)

    def counts(self) -> dict[str, int]:
        """Everything counted so far on this listener, and what is held and queued now."""
        out = {k: v for k, v in self.limiter.counts.items()}
        out.update({f"closed_{k}": v for k, v in self.closed.items()})
        out["held"] = self.limiter.held
        out["queued"] = self.limiter.queued
        return out

    # -- logging -----------------------------------------------------------------------------------------

    def note(self, why: str, source: str | None, event: str = "preauth.closed", **fields: Any) -> None:
        """Count a connection refused before it authenticated, and log it (as ``event``: a refused
        Hello is still ``auth.refused``, with its own, larger budget) unless throttled."""
        self.closed[why] += 1
        throttle = self._throttle if event == "preauth.closed" else self._refusals
        held_back = throttle.allow(self.loop.time())
        if self._summary is None:  # the counts once things settle, or the lines held back
            self._summary = self.loop.call_later(throttle.interval_s, self._flush)
        if held_back is None:
            return
        self._logged = self.counts()
        self.log.warning(
            event,
            listener=self.name,
            why=why,
            source=source,
            held_back=held_back,
            counts=self._logged,
            **fields,
        )

    def _flush(self) -> None:
        """At the end of a log window after a closure: one summary line if lines were held back or
        the counts moved since the last line (so the log ends with the settled figures); queued
        connections that waited too long are dropped here too when nothing else arrives."""
        self._summary = None
        self.limiter.expire(self.loop.time())
        held_back = self._throttle.suppressed + self._refusals.suppressed
        counts = self.counts()
        if held_back or counts != self._logged:
            self._throttle.suppressed = self._refusals.suppressed = 0
            self._logged = counts
            self.log.warning("preauth.summary", listener=self.name, held_back=held_back, counts=counts)
        if self.limiter.queued:
            self._summary = self.loop.call_later(self._throttle.interval_s, self._flush)
