"""The console's timeline: the last topology events a node saw (joined, died, left, promoted, plan
changed), newest first.

The node already names these moments in its structured log (``peer.joined``, ``peer.died``,
``peer.left``, ``standby.promoting``, ``standby.promoted``, ``standby.demoted``, ``election.plan``), and
the log is written whether or not anyone watches. So the timeline taps the log: :func:`timeline_entry`
is the pure mapping from one log record to an entry, :class:`Timeline` the thread-safe ring buffer the
node owns (it outlives a console restart, as on standby promotion) and the console reads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

TIMELINE_SIZE = 50

# Log event -> timeline kind; the record's own fields say which node and model.
KINDS: dict[str, str] = {
    "peer.joined": "joined",
    "peer.died": "died",
    "peer.left": "left",
    "standby.promoting": "promoting",
    "standby.promoted": "promoted",
    "standby.demoted": "demoted",
    "election.plan": "plan",
}


def _short(node_id: object) -> str:
    return str(node_id)[:8] if node_id else ""


def _plan_text(record: Mapping[str, Any]) -> str:
    mode = str(record.get("mode", ""))
    host = _short(record.get("host"))
    workers = [_short(w) for w in record.get("workers") or ()]
    fractions = [f"{float(f):.2f}" for f in record.get("fractions") or () if isinstance(f, int | float)]
    detail = str(record.get("detail") or "")
    if mode == "split":
        text = f"split: host {host}, workers {', '.join(workers)}"
        if fractions:
            text += f" ({' / '.join(fractions)})"
    elif mode == "solo":
        text = f"solo on {host}" if host else "solo"
    else:
        text = mode
    return f"{text}: {detail}" if detail else text


def timeline_entry(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The timeline entry for one log record, or ``None`` when the record is not a topology event.

    Peer events name the peer (``peer``, ``peer_name``); the node's own events (promotion, plans)
    name the node that logged them (``node_id``, ``node``). A peer that joined as a promoted
    standby (its announcement's ``promoted_for``) is a promotion seen from the outside."""
    kind = KINDS.get(str(record.get("event", "")))
    if kind is None:
        return None
    if kind in ("joined", "died", "left"):
        node_id, name = record.get("peer"), record.get("peer_name")
    else:
        node_id, name = record.get("node_id"), record.get("node")
    model = str(record.get("model") or "")
    promoted_for = [str(m) for m in record.get("promoted_for") or ()]
    text = ""
    if kind == "joined" and promoted_for:
        kind, model = "promoted", ", ".join(promoted_for)
        text = "joined as a promoted standby"
    elif kind == "died" or kind in ("promoting", "demoted"):
        text = str(record.get("reason") or "")
    elif kind == "plan":
        text = _plan_text(record)
    return {
        "ts": str(record.get("ts") or ""),
        "kind": kind,
        "node_id": str(node_id or ""),
        "name": str(name or ""),
        "model": model,
        "text": text,
    }


class Timeline:
    """The last :data:`TIMELINE_SIZE` entries, fed from any thread by the node's log tap.

    ``on_change`` (set by the console while it runs) is called after each new entry, outside the
    lock, so the console can push the change to its subscribers at once."""

    def __init__(self, size: int = TIMELINE_SIZE) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] | None = None

    def observe(self, record: Mapping[str, Any]) -> None:
        """The log tap: keep ``record`` if it is a topology event. Never raises into the logger."""
        try:
            entry = timeline_entry(record)
        except Exception:
            return
        if entry is None:
            return
        with self._lock:
            self._seq += 1
            self._entries.append({"seq": self._seq, **entry})
        callback = self.on_change
        if callback is not None:
            try:
                callback()
            except Exception:
                pass

    def entries(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._entries))
