"""Actors that run only on some nodes (the standby, the supervisor) are not told what they would not
need: a node without them logs no ``actor.tell_dropped`` in normal work, so that warning keeps meaning
a fault. Before, a node without a standby warned of a dropped ``SetDemand`` every 10 s while it served
requests, and a node serving no model of a dropped ``DesiredProcesses`` when it started."""

from __future__ import annotations

import pytest

import actors.election as election_module
from actors.election import Election
from meshllm.wire.messages import GetPlan, GetRouteTable, RouteTable, Tick
from tests.actor_dummies import FakeClock, Harness
from tests.support import NodeFactory, wait_until
from tests.test_actor_election import STEP


def test_the_gateway_tells_demand_to_no_standby_on_a_node_without_one(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    assert a.gateway is not None and a.directory.ref("standby") is None

    async def publish() -> None:
        assert a.gateway is not None
        a.gateway.demand.hit("wanted")
        a.gateway.publish_demand()

    a.endpoint.loop_thread.run(publish(), timeout=10)

    def router_counted() -> bool:
        table = a.directory.ask("router", GetRouteTable(), RouteTable)
        return table.demand.get("wanted", 0.0) >= 1.0

    wait_until(router_counted, timeout=10, what="the router to count the demand")
    assert not nodes.logs["a"].find("actor.tell_dropped")


def test_an_election_with_nothing_to_run_tells_no_supervisor(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock().install(monkeypatch, election_module)
    dropped: list[tuple[str, str]] = []
    h.directory.on_dropped = lambda name, message: dropped.append((name, message))
    for name in ("registry", "router", "transport"):  # no "supervisor": this node serves no model
        h.dummy(name)
    Election.start(h.directory, h.logger, own_id="me", vram_bytes=0, models=(), force_split=False)
    clock.advance(STEP)
    h.tell("election", Tick("replan"))
    h.settle("election", GetPlan())
    assert dropped == []
