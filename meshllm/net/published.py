"""The little state a node's endpoint keeps besides its connections: what it answers with (published
by the actors that own it) and its traffic counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from meshllm.wire.messages import Gossip, RouteSnapshot, RouteTable


@dataclass
class Published:
    """What the endpoint answers with, published by the actors that own it: the registry's gossip
    (PeerRegistry owns the view) and the router's table (Router owns it), the latter encoded once
    per version (``route_version`` counts them) because thousands of passive nodes ask for it, and
    kept decoded too, for the table a death notice carries. The endpoint only sends these."""

    gossip: Gossip
    route_table: RouteTable
    route_frame: bytes
    route_version: int = 0
    route_snapshot: RouteSnapshot | None = None  # an active node's: the gateway and tunnels route from it


@dataclass
class Counters:
    """Bytes and frames by stream kind, for ``TransportStats``."""

    bytes_sent: Counter[str]
    frames_sent: Counter[str]
    frames_received: Counter[str]
    probes_sent: int = 0
