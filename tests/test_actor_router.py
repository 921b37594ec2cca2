"""The (active) Router actor alone: fed topology events and LocalServing as msgpack messages, with dummy
"registry" and "transport" actors recording what it tells them, and asked Route and ListModels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from actors.router import Router
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    HostFailed,
    HostInfo,
    ListModels,
    LocalServing,
    ModelList,
    ModelRoute,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    Route,
    RouteReply,
    RouteSnapshot,
    RouteTable,
    Seed,
    Subscribe,
)
from tests.actor_dummies import Harness

OWN = HostInfo(node_id="me", addrs=("me.test:1",), vram_bytes=100)
OWN_MODELS = ("mine",)


def ann(node_id: str, **fields: Any) -> PeerAnnouncement:
    base = PeerAnnouncement(
        node_id=node_id, name=f"n-{node_id}", role="active", addrs=(f"{node_id}.test:1",), vram_bytes=10
    )
    return replace(base, **fields)


def host(a: PeerAnnouncement) -> HostInfo:
    return HostInfo(node_id=a.node_id, addrs=a.addrs, vram_bytes=a.vram_bytes)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    harness.dummy("registry")
    harness.dummy("transport")
    Router.start(harness.directory, harness.logger, own=OWN, own_models=OWN_MODELS)
    harness.settle("router", ListModels())  # what it says from on_start is recorded
    try:
        yield harness
    finally:
        harness.close()


def say(h: Harness, *msgs: Message) -> None:
    for msg in msgs:
        h.tell("router", msg)
    h.settle("router", ListModels())


def route(h: Harness, model: str) -> RouteReply:
    return h.ask("router", Route(model=model), RouteReply)


def table(h: Harness) -> RouteTable:
    h.settle("router", ListModels())
    return h.inboxes["transport"].last(RouteSnapshot).table


def test_start_subscribes_and_offers_a_first_table(h: Harness) -> None:
    assert h.inboxes["registry"].wait_for(Subscribe) == Subscribe(subscriber="router")
    snap = h.inboxes["transport"].wait_for(RouteSnapshot)
    assert snap.table == RouteTable(models=(), unserved=("mine",), actives=(Seed("me", ("me.test:1",)),))


def test_peers_that_serve_a_model_are_its_hosts(h: Harness) -> None:
    b = ann("b", models=("big",), serving=("big",), vram_bytes=80)
    a = ann("a", models=("big",), serving=("big", "small"), addrs=("10.0.0.1:7", "[::1]:7"))
    c = ann("c", models=("wanted",))
    say(h, PeerJoined(peer=b), PeerJoined(peer=a), PeerJoined(peer=c))

    reply = route(h, "big")
    assert reply == RouteReply(
        model="big",
        known=True,
        local_port=0,
        hosts=(host(a), host(b)),  # by node id
        available=("big", "mine", "small", "wanted"),
        local_rpc_port=0,
    )
    assert route(h, "small").hosts == (host(a),)
    wanted = route(h, "wanted")
    assert wanted.known and wanted.hosts == ()  # wanted by a peer, served by nobody yet
    assert route(h, "mine").known


def test_an_unknown_model_is_not_known_and_the_reply_lists_what_is(h: Harness) -> None:
    say(h, PeerJoined(peer=ann("a", serving=("big",))))
    reply = route(h, "nope")
    assert not reply.known and reply.hosts == () and reply.local_port == 0
    assert reply.available == ("big", "mine")


def test_updates_and_departures_change_the_hosts(h: Harness) -> None:
    a, b, c = (ann(n, models=("m",), serving=("m",)) for n in "abc")
    say(h, PeerJoined(peer=a), PeerJoined(peer=b), PeerJoined(peer=c))
    assert [x.node_id for x in route(h, "m").hosts] == ["a", "b", "c"]

    say(h, PeerUpdated(peer=replace(a, serving=(), version=1)))  # a stopped serving it
    assert [x.node_id for x in route(h, "m").hosts] == ["b", "c"]
    say(h, PeerDied(node_id="b", incarnation=0, reason="silent"))
    say(h, PeerLeft(node_id="c", incarnation=0))
    say(h, PeerLeft(node_id="nobody", incarnation=0))
    reply = route(h, "m")
    assert reply.hosts == () and reply.known  # a still wants it

    b2 = replace(b, addrs=("b.test:2",), incarnation=1)  # back, elsewhere
    say(h, PeerJoined(peer=b2))
    assert route(h, "m").hosts == (host(b2),)


def test_host_failed_leaves_the_verdict_to_the_heartbeat(h: Harness) -> None:
    a = ann("a", serving=("m",))
    say(h, PeerJoined(peer=a))
    say(h, HostFailed(model="m", node_id="a"))
    assert route(h, "m").hosts == (host(a),)


def test_local_serving_sets_the_local_ports(h: Harness) -> None:
    say(h, LocalServing(model="mine", port=8081))
    reply = route(h, "mine")
    assert (reply.local_port, reply.local_rpc_port, reply.hosts) == (8081, 0, ())

    say(h, LocalServing(model="mine", port=5001, kind="rpc-server"))
    reply = route(h, "mine")
    assert (reply.local_port, reply.local_rpc_port) == (8081, 5001)

    say(h, LocalServing(model="mine", port=0))  # stopped (or restarting): not routed to
    reply = route(h, "mine")
    assert (reply.local_port, reply.local_rpc_port) == (0, 5001)
    say(h, LocalServing(model="mine", port=0, kind="rpc-server"))
    assert route(h, "mine").local_rpc_port == 0


def test_list_models(h: Harness) -> None:
    say(
        h,
        PeerJoined(peer=ann("a", models=("big", "wanted"), serving=("big",))),
        LocalServing(model="mine", port=8081),
        LocalServing(model="rpc-only", port=5001, kind="rpc-server"),  # a split share serves nothing itself
    )
    models = h.ask("router", ListModels(), ModelList)
    assert models.served == ("big", "mine")
    assert "wanted" in models.wanted and "rpc-only" not in models.wanted
    assert set(models.wanted) <= {"big", "mine", "wanted"}


def actives(t: RouteTable) -> set[Seed]:
    return set(t.actives)


def change(h: Harness, msg: Message) -> RouteTable:
    """Tell the router something that changes its table: it offers the transport exactly one new one."""
    transport = h.inboxes["transport"]
    mark = transport.mark()
    say(h, msg)
    [snap] = transport.messages(RouteSnapshot, since=mark)
    return snap.table


def test_every_change_offers_the_transport_a_new_table(h: Harness) -> None:
    a = ann("a", models=("big", "other"), serving=("big",), vram_bytes=50)
    b = ann("b", models=("big",), serving=("big",), addrs=("b.test:9",))
    me = Seed("me", ("me.test:1",))

    change(h, PeerJoined(peer=b))
    t = change(h, PeerJoined(peer=a))
    assert (t.models, t.unserved) == ((ModelRoute("big", (host(a), host(b))),), ("mine", "other"))
    assert t.actives[0] == me and actives(t) == {me, Seed("b", ("b.test:9",)), Seed("a", ("a.test:1",))}

    t = change(h, LocalServing(model="mine", port=8081))  # this node's own server is a host like any other
    assert t.models == (ModelRoute("big", (host(a), host(b))), ModelRoute("mine", (OWN,)))
    assert t.unserved == ("other",)

    t = change(h, LocalServing(model="big", port=8082))
    assert t.models[0] == ModelRoute("big", (OWN, host(a), host(b)))  # own first

    t = change(h, PeerUpdated(peer=replace(a, serving=("big", "other"), version=1)))
    assert t.unserved == ()
    t = change(h, PeerDied(node_id="a", incarnation=0, reason="silent"))
    assert (t.models, t.unserved) == ((ModelRoute("big", (OWN, host(b))), ModelRoute("mine", (OWN,))), ())
    assert actives(t) == {me, Seed("b", ("b.test:9",))}

    change(h, PeerLeft(node_id="b", incarnation=0))
    t = change(h, LocalServing(model="big", port=0))
    assert (t.models, t.unserved, t.actives) == ((ModelRoute("mine", (OWN,)),), (), (me,))
    assert table(h) == t


def test_nothing_new_is_not_offered_again(h: Harness) -> None:
    transport = h.inboxes["transport"]
    a = ann("a", serving=("big",))
    say(h, PeerJoined(peer=a))
    mark = transport.mark()
    say(
        h,
        PeerJoined(peer=a),  # the same announcement again
        PeerLeft(node_id="nobody", incarnation=0),
        HostFailed(model="big", node_id="a"),
    )
    assert transport.messages(RouteSnapshot, since=mark) == []
    before = table(h)
    say(h, LocalServing(model="mine", port=5001, kind="rpc-server"))  # not in the table: in the snapshot
    snapshot = transport.wait_for(RouteSnapshot, since=mark)
    assert (snapshot.table, snapshot.local_rpc_ports) == (before, {"mine": 5001})
    mark = transport.mark()
    say(h, PeerUpdated(peer=replace(a, addrs=("a.test:2",), version=1)))
    assert transport.wait_for(RouteSnapshot, since=mark).table.models == (
        ModelRoute("big", (HostInfo("a", ("a.test:2",), 10),)),
    )
