"""Refresh storms (#14): an active node pushes its routing table down passive connections with a death
notice, so passive nodes need not ask; the table is encoded once per version and once per notice;
the server socket reads every waiting datagram when it wakes, so a storm's replies and a member's
probe answers do not queue behind one read a loop iteration.

Figures: ``tests/bench/bench_passive.py --death`` (1,000 and 5,000 passive connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration

import meshllm.wire.framing as framing
from meshllm.net import library_internals
from meshllm.net.endpoint import ALPN, MeshEndpoint
from meshllm.net.notices import notice_payloads, read_pushed_routes
from meshllm.node import Node
from meshllm.routing import drop_host, hosted_by, without_dead_host
from meshllm.wire.admission import make_hello
from meshllm.wire.codec import Message
from meshllm.wire.framing import FrameBuffer, StreamKind, pack_frame, pack_stream_start, read_frame_as
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import InviteToken
from meshllm.wire.messages import (
    BroadcastPeerDown,
    GetRouteTable,
    Hello,
    HostInfo,
    ModelRoute,
    PeerDown,
    PeerLeaving,
    RouteRequest,
    RouteTable,
    Seed,
)
from tests.support import NodeFactory, fed_reader, wait_until


def hi(node_id: str) -> HostInfo:
    return HostInfo(node_id=node_id, addrs=(f"{node_id}.test:1",), vram_bytes=1)


TABLE = RouteTable(
    models=(
        ModelRoute("big", (hi("a"), hi("b"))),
        ModelRoute("small", (hi("b"),)),
        ModelRoute("x", (hi("a"),)),
    ),
    unserved=("later",),
    actives=(Seed("a", ("a.test:1",)), Seed("b", ("b.test:1",))),
)


# -- pure -------------------------------------------------------------------------------------------------


def test_drop_host_takes_a_dead_node_out_of_every_model_and_the_actives() -> None:
    after = drop_host(TABLE, "b")
    assert [(m.name, [h.node_id for h in m.hosts]) for m in after.models] == [
        ("big", ["a"]),
        ("small", []),
        ("x", ["a"]),
    ]
    assert after.actives == (Seed("a", ("a.test:1",)),)
    assert after.unserved == TABLE.unserved
    assert hosted_by(TABLE, "b") == ("big", "small")


def test_drop_host_for_one_model_keeps_the_node_elsewhere_and_a_table_without_it_is_the_same() -> None:
    after = drop_host(TABLE, "b", "big")
    assert [h.node_id for h in after.models[0].hosts] == ["a"] and after.models[1] == TABLE.models[1]
    assert after.actives == TABLE.actives
    assert drop_host(TABLE, "nobody") is TABLE


def test_passive_connections_get_the_table_after_the_notice_and_members_the_notice_alone() -> None:
    notice = PeerDown(node_id="b", incarnation=2, reporter="a")
    plain, pushed = notice_payloads(StreamKind.PEER_DOWN, notice, drop_host(TABLE, "b"))
    assert plain == pack_stream_start(StreamKind.PEER_DOWN, notice)
    assert pushed[0] == StreamKind.PEER_DOWN
    assert FrameBuffer().feed(pushed[1:]) == [notice, drop_host(TABLE, "b")]
    assert notice_payloads(StreamKind.PEER_DOWN, notice, None) == (plain, plain)  # a passive node's


def test_the_pushed_table_is_read_after_the_notice_and_an_older_senders_end_of_stream_is_none() -> None:
    async def run() -> list[Any]:
        return [
            await read_pushed_routes(fed_reader(pack_frame(TABLE))),
            await read_pushed_routes(fed_reader(b"")),  # an older active node: the notice, then FIN
            await read_pushed_routes(fed_reader(pack_frame(PeerLeaving(node_id="b", incarnation=1)))),
            await read_pushed_routes(fed_reader(b"\x00\x00\x00\x09\xc1")),  # cut inside a frame
            await read_pushed_routes(fed_reader(b"", eof=False), timeout=0.05),  # nothing more comes
        ]

    assert asyncio.run(run()) == [TABLE, None, None, None, None]


# -- the endpoint ------------------------------------------------------------------------------------------


@pytest.mark.serial
def test_the_server_socket_reads_every_waiting_datagram_when_it_wakes() -> None:
    """asyncio reads one datagram a loop iteration: behind a busy loop the socket's queue grows and the
    kernel drops. Drained (128 a wake), a backlog of 200 is read within five iterations (one at a time: five)."""

    class Count(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.n = 0

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.n += 1

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        proto = Count()
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
        library_internals.drain_datagrams(transport, 128)
        port = transport.get_extra_info("sockname")[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            for _ in range(200):  # within the socket's default buffer
                out.sendto(b"x" * 100, ("127.0.0.1", port))
        seen = []
        for _ in range(5):
            await asyncio.sleep(0)  # one loop iteration, one wake of the socket
            seen.append(proto.n)
        transport.close()
        return seen

    seen = asyncio.run(run())
    assert seen[-1] == 200, seen


class _Passive(QuicConnectionProtocol):
    """A bare passive connection that records the notice streams the active node opens."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw["stream_handler"] = self._on_stream  # aioquic's connect passes None
        super().__init__(*args, **kw)
        self.notices: list[list[Message]] = []
        self.readers: set[asyncio.Future[None]] = set()

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def read() -> None:
            data = await reader.read()
            self.notices.append(FrameBuffer().feed(data[1:]))

        self.readers.add(asyncio.ensure_future(read()))


async def _hold_passive(
    token: InviteToken, port: int, n: int, until: threading.Event, out: list[_Passive]
) -> None:
    """``n`` passive connections to the node, each admitted with a route request, held until ``until``."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            conn = await stack.enter_async_context(
                connect("127.0.0.1", port, configuration=config, create_protocol=_Passive)
            )
            assert isinstance(conn, _Passive)
            reader, writer = await conn.create_stream()
            hello = make_hello(NodeIdentity.generate(), token.mesh_id, token.grant, "client", token.node_id)
            writer.write(pack_stream_start(StreamKind.ROUTE_REQUEST, hello, RouteRequest()))
            writer.write_eof()
            await read_frame_as(reader, Hello)
            await read_frame_as(reader, RouteTable)
            out.append(conn)
        while not until.is_set():
            await asyncio.sleep(0.02)


@contextlib.contextmanager
def passive_connections(node: Node, token: InviteToken, n: int) -> Iterator[list[_Passive]]:
    """``n`` passive connections to ``node``, admitted and held (on a thread) for the ``with`` block."""
    stop, held = threading.Event(), []
    thread = threading.Thread(target=lambda: asyncio.run(_hold_passive(token, node.quic_port, n, stop, held)))
    thread.start()
    try:
        wait_until(lambda: len(held) == n, timeout=20, what=f"{n} passive connections")
        yield held
    finally:
        stop.set()
        thread.join(20)


def node_with_a_client_token(nodes: NodeFactory) -> tuple[Node, MeshEndpoint, InviteToken]:
    a = nodes.start("a")
    assert isinstance(a.endpoint, MeshEndpoint)
    return a, a.endpoint, InviteToken.decode(a.invite("client"))


def count_encodings(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """From now on, how many times each message type is encoded into a frame."""
    encoded: Counter[str] = Counter()
    real = framing.encode

    def counting(msg: Message) -> bytes:
        encoded[type(msg).__name__] += 1
        return real(msg)

    monkeypatch.setattr(framing, "encode", counting)
    return encoded


def test_a_death_notice_carries_the_table_packed_once_for_every_passive_connection(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, ep, token = node_with_a_client_token(nodes)
    with passive_connections(a, token, 5) as held:
        version = ep.published.route_version
        encoded = count_encodings(monkeypatch)
        table = ep.published.route_table
        notice = PeerDown(node_id="someone-dead", incarnation=1, reporter=a.node_id)
        ep.loop_thread.run(ep.broadcast_peer_down(notice), timeout=10)
        wait_until(lambda: all(c.notices for c in held), timeout=10, what="every notice")
        assert encoded["RouteTable"] == 1 and encoded["PeerDown"] == 1  # once, not once per connection
        assert all(c.notices == [[notice, drop_host(table, "someone-dead")]] for c in held)
        assert ep.published.route_version == version


def test_the_table_pushed_with_a_death_keeps_what_the_dead_node_served_without_a_host(
    nodes: NodeFactory,
) -> None:
    """The sender's own table may already be rebuilt without the dead node: the models it served are
    listed with no host, so a passive node whose table never saw it serve them still learns of the gap."""
    a, ep, token = node_with_a_client_token(nodes)
    with passive_connections(a, token, 1) as held:
        table = ep.published.route_table
        notice = PeerDown(node_id="someone-dead", incarnation=1, reporter=a.node_id)
        # As the registry asks for it: through the transport actor to the endpoint.
        a.directory.tell("transport", BroadcastPeerDown(notice=notice, served=("gone-model",)))
        wait_until(lambda: held[0].notices, timeout=10, what="the notice")
        [[got, pushed]] = held[0].notices
        assert got == notice
        assert pushed == without_dead_host(table, "someone-dead", ("gone-model",))
        assert ModelRoute("gone-model", ()) in pushed.models


def test_route_requests_are_answered_from_the_frame_encoded_once_per_version(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, ep, token = node_with_a_client_token(nodes)
    version = ep.published.route_version
    encoded = count_encodings(monkeypatch)

    async def ask(n: int) -> list[RouteTable]:
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
        tables = []
        async with connect("127.0.0.1", a.quic_port, configuration=config) as conn:
            for i in range(n):
                reader, writer = await conn.create_stream()
                if i == 0:
                    hello = make_hello(
                        NodeIdentity.generate(), token.mesh_id, token.grant, "client", token.node_id
                    )
                    writer.write(pack_stream_start(StreamKind.ROUTE_REQUEST, hello, RouteRequest()))
                else:
                    writer.write(pack_stream_start(StreamKind.ROUTE_REQUEST, RouteRequest()))
                writer.write_eof()
                if i == 0:
                    await read_frame_as(reader, Hello)
                tables.append(await read_frame_as(reader, RouteTable))
        return tables

    tables = asyncio.run(ask(20))
    assert ep.published.route_version == version  # nothing changed meanwhile
    assert encoded["RouteTable"] == 0 and all(t == tables[0] for t in tables)


# -- a mesh ------------------------------------------------------------------------------------------------


def test_a_passive_node_learns_of_a_death_from_the_notice_without_asking(nodes: NodeFactory) -> None:
    """A client holds a connection to a; c dies silently. a pushes its table without c down the
    client's connection: the client takes it, and a serves it no route request."""
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    c = nodes.start("c", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id, c.node_id}, timeout=20, what="a to see b and c")
    client = nodes.start("client", join=(a.invite("client"),), role="client")

    def client_actives() -> set[str]:
        table = client.directory.ask("router", GetRouteTable(), RouteTable, 5)
        return {s.node_id for s in table.actives}

    wait_until(lambda: client_actives() == {a.node_id, b.node_id, c.node_id}, timeout=20, what="full table")
    ep = a.endpoint
    assert ep is not None
    asked = ep.counters.frames_received["ROUTE_REQUEST"]
    c_id = c.node_id
    c.stop(leave=False)  # silent death: a's heartbeat (or b's notice) buries it, a tells its passive nodes
    died = nodes.logs["client"].wait_for("routes.host_died", timeout=15, host=c_id)
    assert died["pushed"] is True  # the table came with the notice
    assert client_actives() == {a.node_id, b.node_id}
    assert ep.counters.frames_received["ROUTE_REQUEST"] == asked
