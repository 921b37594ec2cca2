"""Before admission: how many connections that have not authenticated yet a listener holds, and for
how long. Pure decisions (no I/O, no clock of its own), used by both listeners - QUIC
(:mod:`meshllm.net.quic_listener`) and the TLS fast path (:mod:`meshllm.net.fast_path`).

Why: until its Hello verifies, a connection is anyone's - it costs the node memory (QUIC state, TLS
buffers, a socket) and CPU (handshakes), and proves nothing. So each listener counts the connections
it holds that have not authenticated yet, per source address and in all, and gives each
:data:`AUTH_DEADLINE_S` to authenticate. Authenticated connections are never counted: a mesh with
thousands of passive clients keeps them all.

Beyond the per-source or total cap a connection is *queued*, not refused: legitimate clients
authenticate within milliseconds, so a slot frees almost at once, but a burst of hundreds of them from
one address (a load test on loopback, many clients behind one NAT, a node restarting its tunnels)
would transiently exceed any per-source cap that still means something. The queue is bounded (per
source and in all) and a queued connection waits at most :data:`QUEUE_WAIT_S`; beyond that it is
refused. When a slot frees, the queued connection whose source holds the fewest slots goes first (FIFO
among equals), so a flood from some addresses does not starve the next address to connect.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# The numbers, in one place (each listener - QUIC, fast path - has its own budget of each):
AUTH_DEADLINE_S = 3.0
"""From a connection's first packet (QUIC) or its accept (TCP) to a verified Hello. A legitimate
dialler needs a handshake (QUIC: + one Retry round trip) and one more round trip for the Hello: tens
of ms on a LAN, about a second on a 300 ms path; 3 s leaves room for a loaded node. Longer only
lets a silent connection hold its slot longer."""
PER_SOURCE = 16
"""Unauthenticated connections one address may hold: a node opens a handful at once (a gossip dial,
a route request, a fast-path tunnel per concurrent API request); 16 leaves room for a few nodes
behind one NAT, and an attacker at one address gets no more than 16 slots of the total."""
TOTAL = 256
"""Unauthenticated connections a listener holds in all: at ~100 KiB each (QUIC connection state and
stream buffers, or a TLS socket) about 25 MiB at worst, and far more than legitimate traffic needs:
a node's route-request burst is bounded by its clients' refresh spread, and each authenticates in ms."""
QUEUE_PER_SOURCE = 256
"""Connections of one address waiting for a slot: a burst of 200 passive clients started at once on
one machine must get through (tests/test_preauth_flood.py), not be refused."""
QUEUE_TOTAL = 512
"""Connections waiting in all. A queued QUIC attempt is one held datagram (~1.2 KiB), a queued TCP
connection one accepted socket that has not started TLS: cheap, but file descriptors are finite."""
QUEUE_WAIT_S = 5.0
"""How long a connection may wait in the queue: beyond it the dialler has given up anyway (a route
request waits 3 s, a fast-path connect 3 s before falling back to QUIC)."""
MAX_HELLO_BYTES = 16 * 1024
"""The largest frame read before admission (a Hello with its grant is under 1 KiB): a bigger length
prefix is refused before any of its bytes are buffered (after admission frames may be 1 MiB)."""
MAX_PREAUTH_BYTES = 64 * 1024
"""Stream bytes a QUIC connection may send before it authenticates: aioquic buffers whatever arrives
(its flow-control window grows with what is received, not with what is read), so an unauthenticated
connection that sends more than a few Hellos' worth is closed at once."""
LOG_BURST = 5
LOG_INTERVAL_S = 10.0
"""Refusals and deadline closures are logged at most :data:`LOG_BURST` times per
:data:`LOG_INTERVAL_S` per listener; each logged line carries the running counts, so a flood shows in
the log without flooding it."""


def source_key(peer: Any) -> str:
    """What counts as one source: an IPv4 address, or an IPv6 /64 (one host's usual allocation:
    counting single IPv6 addresses would let one host take every slot). Unparsable: itself."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Verdict(enum.Enum):
    """What happens to a connection that arrives."""

    ADMIT = "admit"  # it holds a slot now
    QUEUE = "queue"  # it waits for one
    REFUSE = "refuse"  # closed now (the queue is full)


@dataclass(frozen=True)
class Limits:
    """The caps of one listener (defaults above; tests shrink them)."""

    per_source: int = PER_SOURCE
    total: int = TOTAL
    queue_per_source: int = QUEUE_PER_SOURCE
    queue_total: int = QUEUE_TOTAL
    queue_wait_s: float = QUEUE_WAIT_S


@dataclass
class _Waiting(Generic[T]):
    source: str
    ticket: T
    since: float


class PreAuthLimiter(Generic[T]):
    """Counts unauthenticated connections per source and in all; queues what is over the caps.

    ``ticket`` is whatever the listener needs to resume a queued connection (a held datagram, a
    future). Every :meth:`arrive` answered ADMIT, and every ticket :meth:`release` hands back, holds
    one slot until its :meth:`release` (authenticated, closed, or past its deadline)."""

    def __init__(self, limits: Limits | None = None, on_expire: Callable[[T], None] | None = None) -> None:
        self.limits = limits or Limits()
        self._on_expire = on_expire  # told of each queued ticket dropped for waiting too long
        self._held: Counter[str] = Counter()
        self._queue: list[_Waiting[T]] = []
        self._queued: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        """Outcomes so far: admitted, queued, admitted_from_queue, refused_source_queue_full,
        refused_queue_full, expired_in_queue, withdrawn, released."""

    # -- what a listener asks ---------------------------------------------------------------------------

    def arrive(self, source: str, ticket: T, now: float) -> Verdict:
        """A new connection from ``source``: a slot now, a place in the queue, or refused."""
        self.expire(now)
        lim = self.limits
        if self._held[source] < lim.per_source and self.held < lim.total:
            self._take(source)
            self.counts["admitted"] += 1
            return Verdict.ADMIT
        if self._queued[source] >= lim.queue_per_source:
            self.counts["refused_source_queue_full"] += 1
            return Verdict.REFUSE
        if len(self._queue) >= lim.queue_total:
            self.counts["refused_queue_full"] += 1
            return Verdict.REFUSE
        self._queue.append(_Waiting(source, ticket, now))
        self._queued[source] += 1
        self.counts["queued"] += 1
        return Verdict.QUEUE

    def release(self, source: str, now: float) -> list[T]:
        """A connection of ``source`` gave its slot back; returns the queued tickets admitted in its
        place (each now holds a slot)."""
        if self._held[source] <= 0:
            raise ValueError(f"release of {source} without a held slot")
        self._held[source] -= 1
        if not self._held[source]:
            del self._held[source]
        self.counts["released"] += 1
        return self._admit_queued(now)

    def withdraw(self, source: str, ticket: T) -> bool:
        """A queued connection gave up (closed, its own deadline); False if it was not queued."""
        for i, w in enumerate(self._queue):
            if w.source == source and w.ticket is ticket:
                del self._queue[i]
                self._unqueue(source)
                self.counts["withdrawn"] += 1
                return True
        return False

    def is_queued(self, source: str, ticket: T) -> bool:
        return any(w.source == source and w.ticket is ticket for w in self._queue)

    # -- what a listener reports ------------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Slots held now, all sources."""
        return sum(self._held.values())

    def held_by(self, source: str) -> int:
        return self._held[source]

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- inside ------------------------------------------------------------------------------------------

    def _take(self, source: str) -> None:
        self._held[source] += 1

    def _unqueue(self, source: str) -> None:
        self._queued[source] -= 1
        if not self._queued[source]:
            del self._queued[source]

    def expire(self, now: float) -> None:
        """Drop what has waited longer than the queue allows (also done at every arrive/release)."""
        wait = self.limits.queue_wait_s
        if not self._queue or now - self._queue[0].since <= wait:
            return  # the queue is in arrival order: nothing has waited too long
        expired = [w for w in self._queue if now - w.since > wait]
        self._queue = [w for w in self._queue if now - w.since <= wait]
        for w in expired:
            self._unqueue(w.source)
            self.counts["expired_in_queue"] += 1
            if self._on_expire is not None:
                self._on_expire(w.ticket)

    def _admit_queued(self, now: float) -> list[T]:
        self.expire(now)
        lim = self.limits
        admitted: list[T] = []
        while self._queue and self.held < lim.total:
            # The waiting connection whose source holds the fewest slots (the earliest among equals).
            best = -1
            for i, w in enumerate(self._queue):
                held = self._held[w.source]
                if held < lim.per_source and (best < 0 or held < self._held[self._queue[best].source]):
                    best = i
                    if held == 0:
                        break
            if best < 0:
                break
            w = self._queue.pop(best)
            self._unqueue(w.source)
            self._take(w.source)
            self.counts["admitted_from_queue"] += 1
            admitted.append(w.ticket)
        return admitted


class LogThrottle:
    """At most ``burst`` log lines per ``interval_s``; counts the ones it holds back."""

    def __init__(self, burst: int = LOG_BURST, interval_s: float = LOG_INTERVAL_S) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0
        """Lines held back since the last one let through (reported with it, then reset)."""

    def allow(self, now: float) -> int | None:
        """None: do not log. Otherwise log, and the number returned is how many lines were held
        back before this one."""
        if now - self._window_start >= self.interval_s:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return None
        self._in_window += 1
        held_back, self.suppressed = self.suppressed, 0
        return held_back
