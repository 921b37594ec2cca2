"""An active node's gateway and tunnels answer "where is M served?" from the snapshot the Router
published (:func:`meshllm.routing.route_reply`), not by asking it: an ask is a thread hop to the
router and back, ~2 ms at the start of a request on an idle 2-core machine, paid on every node a
request crosses. The snapshot must follow every change the Router's own answer would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from meshllm.routing import route_reply
from meshllm.wire.messages import HostInfo, LocalServing, ModelRoute, RouteSnapshot, RouteTable
from tests.support import NodeFactory, wait_until


def test_the_gateway_routes_and_lists_from_the_snapshot_without_asking_the_router(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = nodes.start("a")
    wait_until(lambda: a.endpoint.route_now("m") is not None, timeout=10, what="the router's snapshot")
    asked: list[Any] = []
    real_ask = a.directory.ask_async

    async def recording_ask(name: str, msg: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(msg)
        return await real_ask(name, msg, *args, **kwargs)

    monkeypatch.setattr(a.directory, "ask_async", recording_ask)
    request = urllib.request.Request(
        a.api_url + "/chat/completions",
        data=json.dumps({"model": "m", "messages": []}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["error"]["code"] == "model_not_found"
    with urllib.request.urlopen(a.api_url + "/models", timeout=10) as listed:
        assert json.loads(listed.read())["object"] == "list"
    assert asked == []


def test_the_snapshot_follows_the_routers_local_ports_even_where_the_table_does_not(
    nodes: NodeFactory,
) -> None:
    a = nodes.start("a")
    a.directory.tell("router", LocalServing(model="m", port=4242))
    wait_until(
        lambda: (r := a.endpoint.route_now("m")) is not None and r.local_port == 4242 and r.known,
        timeout=10,
        what="the llama-server port in the snapshot",
    )
    # An rpc-server's port changes no routing table entry; the snapshot must still carry it.
    a.directory.tell("router", LocalServing(model="big", port=4343, kind="rpc-server"))
    wait_until(
        lambda: (r := a.endpoint.route_now("big")) is not None and r.local_rpc_port == 4343,
        timeout=10,
        what="the rpc-server port in the snapshot",
    )
    a.directory.tell("router", LocalServing(model="m", port=0))
    wait_until(
        lambda: (r := a.endpoint.route_now("m")) is not None and r.local_port == 0,
        timeout=10,
        what="the llama-server port gone from the snapshot",
    )


def test_a_node_whose_router_stopped_has_no_snapshot_to_route_from(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    wait_until(lambda: a.endpoint.route_now("m") is not None, timeout=10, what="the router's snapshot")
    ref = a.directory.ref("router")
    assert ref is not None
    ref.stop()
    assert a.endpoint.route_now("m") is None  # the gateway asks, and answers 503 (test_gateway_errors)


def test_route_reply_leaves_this_node_out_of_the_remote_hosts() -> None:
    me = HostInfo(node_id="me", addrs=("me:1",), vram_bytes=1)
    other = HostInfo(node_id="other", addrs=("other:1",), vram_bytes=1)
    table = RouteTable(models=(ModelRoute(name="m", hosts=(me, other)),), unserved=("w",), actives=())
    snapshot = RouteSnapshot(table=table, own_id="me", local_ports={"m": 7000}, local_rpc_ports={"w": 7001})
    reply = route_reply(snapshot, "m")
    assert (reply.known, reply.local_port, reply.hosts) == (True, 7000, (other,))
    assert set(reply.available) == {"m", "w"}
    wanted = route_reply(snapshot, "w")
    assert (wanted.known, wanted.local_port, wanted.hosts, wanted.local_rpc_port) == (True, 0, (), 7001)
    assert not route_reply(snapshot, "nothing").known
