"""The pure part of the peer registry: merging announcements, the dead set, candidates to dial.

No I/O and no clock of its own (callers pass ``now``), so every rule - newest wins, no resurrection
by stale gossip, a restarted node is accepted again - is tested without a network.

Every announcement that would change the view - a join, an update, a candidate to dial - must first
be signed by the node it describes (:mod:`meshllm.wire.announcement`); one that is not is refused
and reported in the :class:`Change`, and never replaces what the view holds. Records that would
change nothing (not newer than what we hold) are not even checked: gossip repeats them every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm.wire.announcement import AnnouncementVerifier
from meshllm.wire.messages import PeerAnnouncement


@dataclass
class DeadEntry:
    incarnation: int
    expires_at: float
    addrs: tuple[str, ...] = ()
    next_try: float = 0.0
    left: bool = False  # it said it was leaving: only a new incarnation (a restart) brings it back


@dataclass
class Candidate:
    addrs: tuple[str, ...]
    next_try: float = 0.0
    failures: int = 0
    seed: bool = False


@dataclass
class Change:
    """What a merge did, so the actor can publish events."""

    joined: list[PeerAnnouncement] = field(default_factory=list)
    updated: list[PeerAnnouncement] = field(default_factory=list)
    new_candidates: list[str] = field(default_factory=list)
    refused: list[tuple[PeerAnnouncement, str]] = field(default_factory=list)  # with the reason


class PeerView:
    """Active peers by node id, the dead set, and nodes heard of but not yet met."""

    def __init__(self, own_id: str, dead_ttl_s: float, verifier: AnnouncementVerifier | None = None) -> None:
        self.own_id = own_id
        self.dead_ttl_s = dead_ttl_s
        self.verifier = verifier or AnnouncementVerifier()
        self.peers: dict[str, PeerAnnouncement] = {}
        self.last_seen: dict[str, float] = {}
        self.dead: dict[str, DeadEntry] = {}
        self.candidates: dict[str, Candidate] = {}

    def is_buried(self, ann: PeerAnnouncement, now: float) -> bool:
        """True if ``ann`` is no newer than a death we know of (stale gossip must not resurrect)."""
        entry = self.dead.get(ann.node_id)
        return entry is not None and entry.expires_at > now and ann.incarnation <= entry.incarnation

    def merge_direct(self, peer_id: str, anns: tuple[PeerAnnouncement, ...], now: float) -> Change:
        """A gossip exchange with ``peer_id`` itself succeeded: it is alive and active."""
        change = Change()
        own = next((a for a in anns if a.node_id == peer_id), None)
        if own is not None and self._left(own, now):
            own = None  # still answering while it drains its last requests: it is gone all the same
        if own is not None and own.role == "active" and self._believed(own, change):
            self.dead.pop(peer_id, None)  # it answered us directly, whatever we heard before
            self.candidates.pop(peer_id, None)
            known = self.peers.get(peer_id)
            self.last_seen[peer_id] = now
            if known is None:
                self.peers[peer_id] = own
                change.joined.append(own)
            elif own.newer_than(known):
                self.peers[peer_id] = own
                change.updated.append(own)
        for ann in anns:
            if ann.node_id in (peer_id, self.own_id) or ann.role != "active":
                continue
            self._merge_hearsay(ann, now, change)
        return change

    def _left(self, ann: PeerAnnouncement, now: float) -> bool:
        entry = self.dead.get(ann.node_id)
        return entry is not None and entry.left and entry.expires_at > now and ann.incarnation <= entry.incarnation

    def _believed(self, ann: PeerAnnouncement, change: Change) -> bool:
        """Whether ``ann`` may change the view: true when it would change nothing (no need to check a
        record we already hold or that is older), else only when its own node signed it."""
        known = self.peers.get(ann.node_id)
        if known is not None and not ann.newer_than(known):
            return True
        reason = self.verifier.refusal(ann)
        if reason is not None:
            change.refused.append((ann, reason))
            return False
        return True

    def _merge_hearsay(self, ann: PeerAnnouncement, now: float, change: Change) -> None:
        if self.is_buried(ann, now):
            return
        known = self.peers.get(ann.node_id)
        if known is not None and not ann.newer_than(known):
            return
        if not self._believed(ann, change):
            return
        if known is not None and ann.incarnation == known.incarnation:
            self.peers[ann.node_id] = ann
            change.updated.append(ann)
            return
        # Not met yet, or a restart we have not seen directly: meet it before trusting it.
        self._add_candidate(ann, change)

    def _add_candidate(self, ann: PeerAnnouncement, change: Change) -> None:
        cand = self.candidates.get(ann.node_id)
        if cand is None:
            self.candidates[ann.node_id] = Candidate(addrs=ann.addrs)
            change.new_candidates.append(ann.node_id)
        else:
            cand.addrs = ann.addrs

    def add_seed(self, node_id: str, addrs: tuple[str, ...]) -> None:
        if node_id != self.own_id and node_id not in self.peers:
            self.candidates[node_id] = Candidate(addrs=addrs, seed=True)

    def due_candidates(self, now: float) -> list[tuple[str, tuple[str, ...]]]:
        return [(nid, c.addrs) for nid, c in self.candidates.items() if c.next_try <= now]

    def candidate_attempted(self, node_id: str, now: float, base_backoff_s: float) -> None:
        cand = self.candidates.get(node_id)
        if cand is not None:
            cand.next_try = now + base_backoff_s

    def candidate_failed(self, node_id: str, now: float, base_backoff_s: float, max_backoff_s: float) -> bool:
        """Back off a failed dial; non-seed candidates are dropped after a few failures. True if kept."""
        cand = self.candidates.get(node_id)
        if cand is None:
            return False
        cand.failures += 1
        if not cand.seed and cand.failures >= 5:
            del self.candidates[node_id]
            return False
        cand.next_try = now + min(max_backoff_s, base_backoff_s * 2 ** (cand.failures - 1))
        return True

    def bury(self, node_id: str, incarnation: int, now: float, left: bool = False) -> PeerAnnouncement | None:
        """Mark a node dead at ``incarnation`` (``left``: it said it was leaving, so it is not dialled
        again and a direct answer of that life does not bring it back); returns the peer it removed."""
        removed = self.peers.get(node_id)
        if removed is not None and removed.incarnation > incarnation:
            return None  # the notice is about an older life of this node
        entry = self.dead.get(node_id)
        inc = max(incarnation, entry.incarnation if entry else 0, removed.incarnation if removed else 0)
        addrs = removed.addrs if removed is not None else (entry.addrs if entry else ())
        left = left or (entry is not None and entry.left and entry.incarnation >= inc)
        self.dead[node_id] = DeadEntry(
            incarnation=inc, expires_at=now + self.dead_ttl_s, addrs=addrs, next_try=now, left=left
        )
        self.peers.pop(node_id, None)
        self.last_seen.pop(node_id, None)
        self.candidates.pop(node_id, None)
        return removed

    def due_graves(self, now: float, interval_s: float) -> list[tuple[str, tuple[str, ...]]]:
        """Buried nodes to dial once more (at most every ``interval_s``). A node declared dead by
        mistake - two overloaded nodes can bury each other - is met again this way; only a direct
        answer brings it back, never hearsay."""
        due = []
        for node_id, entry in self.dead.items():
            if entry.left:
                continue
            if entry.addrs and entry.next_try + interval_s <= now and entry.expires_at > now:
                entry.next_try = now
                due.append((node_id, entry.addrs))
        return due

    def expire(self, now: float) -> None:
        for nid in [n for n, e in self.dead.items() if e.expires_at <= now]:
            del self.dead[nid]
