"""The PassiveRouter actor alone: a client's routing table fetched through a dummy "transport", fed
RoutesReceived / RoutesFailed / HostFailed / PeerDownReceived as msgpack messages and asked Route,
ListModels, GetPlan and GetStatus.

Its refresh timer ticks every second; most tests move a fake clock instead of waiting, and send the
ticks themselves (a timer tick landing in between sees the same clock and does the same thing).
"""

from __future__ import annotations

import dataclasses

import pytest

import actors.passive_router as passive_module
from actors.passive_router import EAGER_REFRESH_S, NOTICE_SPREAD_S, RETRY_S, PassiveRouter
from meshllm.placement import rank_hosts
from meshllm.routing import without_dead_host
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    GetPlan,
    GetStatus,
    HostFailed,
    HostInfo,
    HostsLost,
    ListModels,
    ModelList,
    ModelRoute,
    ModelStatus,
    PeerDown,
    PeerDownReceived,
    PeerLeaving,
    PeerLeavingReceived,
    PlanReply,
    RefreshRoutes,
    Route,
    RouteReply,
    RoutesChanged,
    RoutesFailed,
    RoutesReceived,
    RouteTable,
    Seed,
    StatusReply,
    Subscribe,
    Tick,
)
from tests.actor_dummies import FakeClock, Harness

SEED = Seed("seed", ("seed.test:1",))
REFRESH_S = 30.0


def hi(node_id: str) -> HostInfo:
    return HostInfo(node_id=node_id, addrs=(f"{node_id}.test:1",), vram_bytes=len(node_id))


HOSTS = tuple(hi(f"host-{i}") for i in range(4))
TABLE = RouteTable(
    models=(ModelRoute("big", HOSTS), ModelRoute("small", (HOSTS[1],))),
    unserved=("later",),
    actives=(Seed("host-0", ("host-0.test:1",)), Seed("host-1", ("host-1.test:1",))),
)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock().install(monkeypatch, passive_module)


def start(h: Harness, own_id: str = "client-1") -> None:
    """Start it and wait for the refresh it asks for at once."""
    transport = h.dummy("transport")
    PassiveRouter.start(
        h.directory, h.logger, own_id=own_id, own_name="c1", role="client", seeds=(SEED,), refresh_s=REFRESH_S
    )
    assert transport.wait_for(RefreshRoutes) == RefreshRoutes(actives=(SEED,))


def say(h: Harness, *msgs: Message) -> None:
    for msg in msgs:
        h.tell("router", msg)
    h.settle("router", GetStatus())


def refreshes(h: Harness) -> list[RefreshRoutes]:
    return h.inboxes["transport"].messages(RefreshRoutes)


def tick(h: Harness) -> int:
    """One refresh tick; the number of refreshes asked for so far."""
    say(h, Tick("refresh"))
    return len(refreshes(h))


def route(h: Harness, model: str) -> RouteReply:
    return h.ask("router", Route(model=model), RouteReply)


def test_it_asks_for_routes_at_once_and_retries_by_itself(h: Harness) -> None:
    start(h)
    say(h, RoutesFailed(reason="no active node answered"))
    # Its own timer asks again after the first back-off (one second).
    retry = h.inboxes["transport"].wait_for(RefreshRoutes, n=2)
    assert retry == RefreshRoutes(actives=(SEED,))
    [failed] = h.log.events("routes.refresh_failed")
    assert failed["retry_in_s"] == RETRY_S[0] and failed["reason"] == "no active node answered"


def test_a_received_table_answers_the_gateway(h: Harness) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))

    reply = route(h, "small")
    assert reply == RouteReply(
        model="small",
        known=True,
        local_port=0,
        hosts=(HOSTS[1],),
        available=("big", "later", "small"),
        spread=False,  # already in this client's order of preference
    )
    later = route(h, "later")
    assert later.known and later.hosts == ()
    assert not route(h, "nope").known
    assert h.ask("router", ListModels(), ModelList).served == ("big", "small")
    assert "later" in h.ask("router", ListModels(), ModelList).wanted
    assert h.ask("router", GetPlan(), PlanReply) == PlanReply(
        models=(
            ModelStatus(name="big", state="serving", hosts=tuple(x.node_id for x in HOSTS)),
            ModelStatus(name="later", state="waiting", hosts=()),
            ModelStatus(name="small", state="serving", hosts=("host-1",)),
        )
    )
    assert h.ask("router", GetStatus(), StatusReply) == StatusReply(
        node_id="client-1", name="c1", role="client", vram_bytes=0, peers=()
    )
    [logged] = h.log.events("routes.refreshed")
    assert logged["source"] == "host-0" and logged["models"] == {"big": 4, "small": 1}


def test_hosts_are_ranked_by_rendezvous_hashing_per_client() -> None:
    ids = [x.node_id for x in HOSTS]
    first = rank_hosts("client-0", "big", ids)[0]
    other = next(f"client-{i}" for i in range(1, 50) if rank_hosts(f"client-{i}", "big", ids)[0] != first)
    shuffled = RouteTable(models=(ModelRoute("big", HOSTS[::-1]),), unserved=(), actives=())

    answers: dict[str, list[tuple[str, ...]]] = {}
    for own_id in ("client-0", other):
        for table in (TABLE, shuffled):
            harness = Harness()
            try:
                start(harness, own_id)
                say(harness, RoutesReceived(source="host-0", table=table))
                hosts = route(harness, "big").hosts
                assert sorted(hosts, key=lambda x: x.node_id) == list(HOSTS)  # the same hosts, whole
                answers.setdefault(own_id, []).append(tuple(x.node_id for x in hosts))
            finally:
                harness.close()
    # Each client's order is the rendezvous order, whatever order the table listed them in ...
    assert answers["client-0"] == [tuple(rank_hosts("client-0", "big", ids))] * 2
    assert answers[other] == [tuple(rank_hosts(other, "big", ids))] * 2
    # ... so clients spread over the hosts instead of all picking the first.
    assert answers["client-0"][0][0] != answers[other][0][0]


def test_the_table_is_refreshed_on_schedule_from_every_known_active(h: Harness, clock: FakeClock) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    clock.advance(REFRESH_S * 2 / 3 - 0.5)  # the earliest a jittered refresh may come
    assert tick(h) == 1
    clock.advance(REFRESH_S * 2 / 3 + 1)  # past the latest
    assert tick(h) == 2
    assert refreshes(h)[-1] == RefreshRoutes(actives=(SEED, *TABLE.actives))


def test_one_refresh_at_a_time(h: Harness, clock: FakeClock) -> None:
    start(h)
    clock.advance(29.75)  # no answer yet: not asked again
    assert tick(h) == 1
    clock.advance(0.25)  # thirty seconds without an answer: the request is taken as lost
    assert tick(h) == 2
    assert tick(h) == 2


def test_failed_refreshes_back_off(h: Harness, clock: FakeClock) -> None:
    start(h)
    for delay in (*RETRY_S, RETRY_S[-1]):
        asked = len(refreshes(h))
        say(h, RoutesFailed(reason="unreachable"))
        clock.advance(delay - 0.25)
        assert tick(h) == asked, f"asked again before the {delay}s back-off"
        clock.advance(0.25)
        assert tick(h) == asked + 1
    assert [e["retry_in_s"] for e in h.log.events("routes.refresh_failed")] == [*RETRY_S, RETRY_S[-1]]

    say(h, RoutesReceived(source="host-0", table=TABLE), RoutesFailed(reason="again"))  # success resets it
    clock.advance(RETRY_S[0])
    assert tick(h) == len(RETRY_S) + 3


def test_a_failed_host_is_dropped_for_that_model_and_the_table_refreshed_soon(
    h: Harness, clock: FakeClock
) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    say(h, HostFailed(model="big", node_id="host-1"))
    assert [x.node_id for x in route(h, "big").hosts] == [
        n for n in rank_hosts("client-1", "big", [x.node_id for x in HOSTS]) if n != "host-1"
    ]
    assert route(h, "small").hosts == (HOSTS[1],)  # only for the model whose tunnel failed
    clock.advance(NOTICE_SPREAD_S)
    assert tick(h) == 2
    assert refreshes(h)[-1].actives == (SEED, *TABLE.actives)


def test_a_death_notice_drops_the_host_everywhere(h: Harness, clock: FakeClock) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    say(
        h,
        PeerDownReceived(
            notice=PeerDown(node_id="host-1", incarnation=1, reporter="host-0"), from_peer="host-0"
        ),
    )
    assert "host-1" not in [x.node_id for x in route(h, "big").hosts]
    small = route(h, "small")
    assert small.hosts == () and small.known
    assert h.ask("router", ListModels(), ModelList).served == ("big",)
    plan = {m.name: m for m in h.ask("router", GetPlan(), PlanReply).models}
    assert plan["small"].state == "waiting" and "host-1" not in plan["big"].hosts
    clock.advance(NOTICE_SPREAD_S)
    assert tick(h) == 2
    assert refreshes(h)[-1].actives == (SEED, Seed("host-0", ("host-0.test:1",)))


def test_a_request_for_a_model_without_hosts_refreshes_early(h: Harness, clock: FakeClock) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    clock.advance(EAGER_REFRESH_S - 0.5)
    route(h, "new-model")  # the table is fresh: no reason to think it is missing something
    assert tick(h) == 1
    clock.advance(0.5)
    route(h, "big")  # it has hosts: nothing to refresh for
    assert tick(h) == 1
    route(h, "new-model")
    assert tick(h) == 2


def test_a_model_list_while_a_wanted_model_comes_up_refreshes_early(h: Harness, clock: FakeClock) -> None:
    """"later" is wanted and not stuck (loading): a client asking for the list gets a fresh table
    within EAGER_REFRESH_S, not at the next scheduled refresh. Once every wanted model is served or
    stuck, listing asks for nothing."""
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    clock.advance(EAGER_REFRESH_S - 0.5)
    h.ask("router", ListModels(), ModelList)  # the table is fresh
    assert tick(h) == 1
    clock.advance(0.5)
    assert h.ask("router", ListModels(), ModelList).wanted == ("later",)
    assert tick(h) == 2

    settled = dataclasses.replace(TABLE, stuck=("later",))
    say(h, RoutesReceived(source="host-0", table=settled))
    clock.advance(EAGER_REFRESH_S)
    h.ask("router", ListModels(), ModelList)
    assert tick(h) == 2


def test_a_leaving_notice_tells_subscribers_what_the_host_served(h: Harness, clock: FakeClock) -> None:
    standby = h.dummy("standby")
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE), Subscribe(subscriber="standby"))
    say(h, PeerLeavingReceived(notice=PeerLeaving(node_id="host-1", incarnation=1)))
    lost = standby.wait_for(HostsLost)
    assert lost.node_id == "host-1" and lost.reason == "leave" and "small" in lost.models
    changed = standby.messages(RoutesChanged)
    assert changed[0].fresh and not changed[-1].fresh  # the notice's table is not a fresh one
    assert route(h, "small").hosts == ()


def test_a_death_notice_with_the_senders_table_is_taken_without_asking(h: Harness, clock: FakeClock) -> None:
    """An active node pushes its table (the dead host already out) with the notice: the client takes
    it as a refresh and asks nobody - a thousand clients asking at once was the storm."""
    standby = h.dummy("standby")
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE), Subscribe(subscriber="standby"))
    after = RouteTable(
        models=(ModelRoute("big", (HOSTS[0], HOSTS[2])), ModelRoute("small", (HOSTS[2],))),
        unserved=(),
        actives=(Seed("host-0", ("host-0.test:1",)), Seed("host-2", ("host-2.test:1",))),
    )
    notice = PeerDown(node_id="host-1", incarnation=1, reporter="host-0")
    say(h, PeerDownReceived(notice=notice, from_peer="host-0", routes=after))
    assert route(h, "small").hosts == (HOSTS[2],)  # a host the client learnt of from the pushed table
    assert {x.node_id for x in route(h, "big").hosts} == {"host-0", "host-2"}
    lost = standby.wait_for(HostsLost)
    assert lost.node_id == "host-1" and lost.models == ("big", "small")
    assert not standby.messages(RoutesChanged)[-1].fresh  # a standby waits for the answer to its claim
    clock.advance(REFRESH_S * 2 / 3 - 1)
    assert tick(h) == 1  # no refresh until the next scheduled one
    assert h.log.events("routes.pushed")[-1]["source"] == "host-0"


def test_a_death_notice_tells_of_a_model_the_dead_host_served_since_our_last_refresh(h: Harness) -> None:
    """Our table is older than the dead host's service of "fresh" (it came up since our last refresh).
    The sender's table lists "fresh" with no host left: it is lost too, so a standby takes the gap."""
    standby = h.dummy("standby")
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE), Subscribe(subscriber="standby"))
    after = without_dead_host(TABLE, "host-1", served=("small", "fresh"))
    assert ModelRoute("fresh", ()) in after.models
    notice = PeerDown(node_id="host-1", incarnation=1, reporter="host-0")
    say(h, PeerDownReceived(notice=notice, from_peer="host-0", routes=after))
    lost = standby.wait_for(HostsLost)
    assert lost.node_id == "host-1" and lost.models == ("big", "small", "fresh")
    assert route(h, "fresh").known and route(h, "fresh").hosts == ()  # waited for, not a 404


def test_a_pushed_table_that_still_lists_the_dead_host_does_not_bring_it_back(h: Harness) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    notice = PeerDown(node_id="host-1", incarnation=1, reporter="host-0")
    say(h, PeerDownReceived(notice=notice, from_peer="host-0", routes=TABLE))  # built before the death
    assert "host-1" not in [x.node_id for x in route(h, "big").hosts]
    assert route(h, "small").hosts == ()


def test_a_leaving_notice_with_the_leavers_table_is_taken_without_asking(
    h: Harness, clock: FakeClock
) -> None:
    start(h)
    say(h, RoutesReceived(source="host-0", table=TABLE))
    after = RouteTable(
        models=(ModelRoute("big", (HOSTS[0],)),), unserved=("small",), actives=TABLE.actives[:1]
    )
    say(h, PeerLeavingReceived(notice=PeerLeaving(node_id="host-1", incarnation=1), routes=after))
    listed = h.ask("router", ListModels(), ModelList)
    assert (listed.served, listed.wanted) == (("big",), ("small",))
    clock.advance(NOTICE_SPREAD_S + 1)
    assert tick(h) == 1
