"""The Standby actor alone: a standby node's decisions fed RoutesChanged and HostsLost as msgpack
messages, with a dummy "router" that records the fresh looks (and claims) it asks for, and a promote
callback that records what the node would restart as."""

from __future__ import annotations

import threading

from actors.standby import Standby
from meshllm.promotion import GIB, Offer
from meshllm.wire.messages import (
    HostsLost,
    RefreshNow,
    RoutesChanged,
    RouteTable,
    Seed,
    Subscribe,
)
from tests.actor_dummies import WAIT, Harness

ACTIVE = Seed("active-1", ("active-1.test:1",))


class Promotions:
    """The promote callback: records (model, reason) and lets a test wait for the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.done = threading.Event()

    def __call__(self, model: str, reason: str, actives: tuple[Seed, ...]) -> None:
        self.calls.append((model, reason))
        self.done.set()


def table(demand: dict[str, float]) -> RouteTable:
    """The active node's table: nothing served, ``demand`` asked for."""
    return RouteTable(models=(), unserved=(), actives=(ACTIVE,), demand=demand)


def test_a_model_seen_in_demand_then_reported_lost_is_taken_for_the_lost_host(h: Harness) -> None:
    router = h.dummy("router")
    promotions = Promotions()
    Standby.start(
        h.directory,
        h.logger,
        own_id="standby-1",
        offers=(Offer("m", GIB, on_disk=True),),
        capacity_bytes=8 * GIB,
        window_s=0.3,
        demote_after_s=60.0,
        promote=promotions,
        demote=lambda *_: None,
    )
    router.wait_for(Subscribe)
    # A table without the model that a client kept asking for: a gap for its demand...
    h.tell("standby", RoutesChanged(table=table({"m": 20.0})))
    # ...then the death notice of the host that had come up for it since that table.
    h.tell("standby", HostsLost(node_id="host-1", reason="death", models=("m",)))
    h.tell("standby", RoutesChanged(table=table({"m": 20.0}), fresh=False))
    # Its claim and its second look, each answered with a fresh table that has no other claim.
    for n in (1, 2):
        assert router.wait_for(RefreshNow, n=n).claim == "m"
        h.tell("standby", RoutesChanged(table=table({"m": 20.0})))
    assert promotions.done.wait(WAIT)
    assert promotions.calls == [("m", "death")]
