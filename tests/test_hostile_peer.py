"""An admitted but hostile peer (issue #13): it holds a valid grant, says a valid Hello, then sends
garbage frames, oversized frames, half a frame then silence, or 10,000 streams - on QUIC and on the
TLS fast path.

Each case checks, where the attacker sees it, that its connection is closed (and soon), and where the
operator does, that ``peer.dropped`` names the peer and the reason; and that the node stays healthy:
an honest client's route request is answered, and its member peer is neither dropped nor declared
dead (:mod:`meshllm.net.misbehaviour` has the policy)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from meshllm.net import fast_path, library_internals, misbehaviour
from meshllm.net.endpoint import ALPN
from meshllm.node import Node
from meshllm.wire.admission import make_hello
from meshllm.wire.codec import MAX_MESSAGE_BYTES, Message, decode
from meshllm.wire.framing import FrameBuffer, StreamKind, pack_frame, pack_stream_start
from meshllm.wire.grants import mint_grant
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.messages import (
    Gossip,
    Hello,
    Refused,
    RouteRequest,
    RouteTable,
    TunnelRequest,
    TunnelResponse,
)
from tests.support import NodeFactory, read_until_closed, until, wait_until

SHORT_S = 1.0  # the stall timeouts, shortened for these tests
UNKNOWN_KIND = 200  # a stream kind byte no node knows (yet)


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(misbehaviour, "STREAM_HEAD_TIMEOUT_S", SHORT_S)
    monkeypatch.setattr(fast_path, "HEADER_TIMEOUT_S", SHORT_S)


@pytest.fixture
def mesh(nodes: NodeFactory, short_timeouts: None) -> Iterator[tuple[Node, Node]]:
    """Node ``a``, the target, and ``b``, an honest member of its mesh that must see nothing."""
    a = nodes.start("a")
    assert a.endpoint is not None
    a.endpoint.control.timeout_s = SHORT_S
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(
        lambda: a.peer_ids() == {b.node_id} and b.peer_ids() == {a.node_id}, 15, what="a and b to meet"
    )
    yield a, b


def hostile_hello(a: Node, role: str) -> tuple[NodeIdentity, Hello]:
    """A fresh key with a genuine grant for ``role`` from a's mesh, and its Hello to ``a``."""
    assert a.membership is not None
    identity = NodeIdentity.generate()
    grant = mint_grant(a.membership.secret, a.membership.mesh_id, role, time.time())
    return identity, make_hello(identity, a.membership.mesh_id, grant, role, a.node_id)


def quic_config() -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)


class Peer(QuicConnectionProtocol):
    """A raw QUIC connection: when it was closed, and what the node said when it closed it."""

    def __init__(self, quic: QuicConnection, **kw: Any) -> None:
        super().__init__(quic, **kw)
        self.closed_at: float | None = None
        self.close_reason = ""

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated) and self.closed_at is None:
            self.closed_at = time.monotonic()
            self.close_reason = event.reason_phrase
        super().quic_event_received(event)


class Session:
    """One raw QUIC connection to ``a``, admitted with a genuine grant (as a client or a member)."""

    def __init__(self, a: Node, role: str = "client") -> None:
        self.a = a
        self.role = role
        self.identity, self.hello = hostile_hello(a, role)
        self.peer: Peer | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.writers: list[asyncio.StreamWriter] = []  # kept: a collected writer ends its stream

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    async def __aenter__(self) -> Session:
        loop = asyncio.get_running_loop()
        self.peer = Peer(QuicConnection(configuration=quic_config()))
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self.peer, local_addr=("127.0.0.1", 0)
        )
        self.peer.connect(("127.0.0.1", self.a.quic_port))
        await asyncio.wait_for(self.peer.wait_connected(), 10)
        if self.role == "active":
            first = pack_stream_start(StreamKind.GOSSIP, self.hello, Gossip(announcements=()))
            expected: type[Message] = Gossip
        else:
            first = pack_stream_start(StreamKind.ROUTE_REQUEST, self.hello, RouteRequest())
            expected = RouteTable
        answer = await self.exchange(first)
        assert isinstance(answer[0], Hello) and isinstance(answer[-1], expected), answer
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.peer is not None:
            self.peer.close()
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, payload: bytes, timeout: float = 10) -> list[Message]:
        """One stream: the payload, its end, and the frames of the answer."""
        assert self.peer is not None
        reader, writer = await self.peer.create_stream()
        writer.write(payload)
        writer.write_eof()
        return FrameBuffer().feed(await asyncio.wait_for(reader.read(), timeout))

    async def send(self, payload: bytes, end: bool = True) -> asyncio.StreamReader:
        """Open a stream and send ``payload`` (ending the stream with ``end``); its reader."""
        assert self.peer is not None
        reader, writer = await self.peer.create_stream()
        writer.write(payload)
        if end:
            writer.write_eof()
        self.writers.append(writer)
        return reader

    async def closed_within(self, timeout: float) -> float:
        """When (``time.monotonic()``) the node closed this connection; fails after ``timeout`` s."""
        await until(lambda: self.peer is not None and self.peer.closed_at is not None, timeout, "the drop")
        assert self.peer is not None and self.peer.closed_at is not None
        return self.peer.closed_at


async def honest_route_request(a: Node) -> RouteTable:
    """What an honest client does: admitted on a new connection, asks for the routing table."""
    async with Session(a) as honest:
        frames = await honest.exchange(pack_stream_start(StreamKind.ROUTE_REQUEST, RouteRequest()), 5)
    assert len(frames) == 1 and isinstance(frames[0], RouteTable), frames
    return frames[0]


def assert_healthy(nodes: NodeFactory, a: Node, b: Node) -> None:
    """``a`` answers an honest client at once, and neither it nor its member ``b`` lost the other."""
    started = time.monotonic()
    asyncio.run(honest_route_request(a))
    assert time.monotonic() - started < 8  # a loaded machine is slow, a starved node never answers
    assert a.peer_ids() == {b.node_id} and b.peer_ids() == {a.node_id}
    for name in ("a", "b"):
        assert not nodes.logs[name].find("peer.died"), name
        assert not nodes.logs[name].find("connection.lost", peer=b.node_id if name == "a" else a.node_id)
    assert not nodes.logs["a"].find("peer.dropped", peer=b.node_id)


def dropped(nodes: NodeFactory, peer: str, timeout: float = 5) -> dict[str, Any]:
    """a's ``peer.dropped`` line for ``peer``."""
    return nodes.logs["a"].wait_for("peer.dropped", timeout, peer=peer)


# -- garbage and oversized frames on QUIC -------------------------------------------------------------------


GARBAGE = {
    "not msgpack": bytes([StreamKind.ROUTE_REQUEST]) + b"\x00\x00\x00\x03\xc1\xc1\xc1",
    "not a message": bytes([StreamKind.ROUTE_REQUEST]) + b"\x00\x00\x00\x01\x07",
    "the wrong message": pack_stream_start(StreamKind.ROUTE_REQUEST, Gossip(announcements=())),
    "an oversized frame": bytes([StreamKind.ROUTE_REQUEST]) + (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"),
    "a stream that ends inside a frame": bytes([StreamKind.ROUTE_REQUEST]) + b"\x00\x00\x01\x00\x93",
    "a tunnel header that is not one": bytes([StreamKind.HTTP_TUNNEL]) + b"\x00\x00\x00\x02\xc1\xc1",
}
WHY = {
    "not msgpack": "MalformedMessage",
    "not a message": "MalformedMessage",
    "the wrong message": "expected RouteRequest, got Gossip",
    "an oversized frame": "MessageTooLarge",
    "a stream that ends inside a frame": "stream ended inside a frame",
    "a tunnel header that is not one": "MalformedMessage",
}


@pytest.mark.parametrize("role", ["client", "active"])
@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_from_an_admitted_peer_drops_it(
    nodes: NodeFactory, mesh: tuple[Node, Node], case: str, role: str
) -> None:
    a, b = mesh

    async def attack() -> tuple[str, list[Message], float]:
        async with Session(a, role) as hostile:
            started = time.monotonic()
            answer = await hostile.exchange(GARBAGE[case])
            return hostile.node_id, answer, await hostile.closed_within(8) - started

    peer, answer, took = asyncio.run(attack())
    assert len(answer) == 1 and isinstance(answer[0], Refused) and WHY[case] in answer[0].reason, answer
    assert took < 8
    record = dropped(nodes, peer)
    assert WHY[case] in record["reason"] and record["role"] == role
    assert_healthy(nodes, a, b)


def test_unknown_kinds_are_refused_and_only_many_of_them_drop_the_peer(
    nodes: NodeFactory, mesh: tuple[Node, Node]
) -> None:
    """A newer node may open a kind of stream this one does not know: refused on that stream only;
    but a peer that keeps doing it is dropped."""
    a, b = mesh

    async def attack() -> tuple[str, float]:
        async with Session(a) as peer:
            started = time.monotonic()
            for _ in range(misbehaviour.UNKNOWN_STRIKES - 1):
                answer = await peer.exchange(bytes([UNKNOWN_KIND]) + pack_frame(RouteRequest()))
                assert answer == [Refused(reason=f"UnknownKind: unknown stream kind {UNKNOWN_KIND}")]
            # Still admitted: its next honest request is answered.
            table = await peer.exchange(pack_stream_start(StreamKind.ROUTE_REQUEST, RouteRequest()))
            assert isinstance(table[-1], RouteTable)
            assert peer.peer is not None and peer.peer.closed_at is None
            started = time.monotonic()
            await peer.exchange(bytes([UNKNOWN_KIND]))
            return peer.node_id, await peer.closed_within(8) - started

    peer, took = asyncio.run(attack())
    assert took < 8
    assert f"{misbehaviour.UNKNOWN_STRIKES} streams refused" in dropped(nodes, peer)["reason"]
    assert_healthy(nodes, a, b)


# -- half a frame, then silence ----------------------------------------------------------------------------


HALF = {
    "a control request": bytes([StreamKind.ROUTE_REQUEST]) + b"\x00\x00\x01\x00" + b"\x93" * 10,
    "a tunnel header": bytes([StreamKind.HTTP_TUNNEL]) + b"\x00\x00\x01\x00" + b"\x96" * 10,
    "a member's rpc tunnel header": bytes([StreamKind.RPC_TUNNEL]) + b"\x00\x00\x00\x40",
}


@pytest.mark.parametrize("case", list(HALF))
def test_half_a_frame_then_silence_is_timed_out_and_drops_the_peer(
    nodes: NodeFactory, mesh: tuple[Node, Node], case: str
) -> None:
    a, b = mesh
    role = "active" if "member" in case else "client"

    async def attack() -> tuple[str, float]:
        async with Session(a, role) as hostile:
            started = time.monotonic()
            await hostile.send(HALF[case], end=False)
            # The node serves others while the stream is held.
            await honest_route_request(a)
            return hostile.node_id, await hostile.closed_within(SHORT_S + 7) - started

    peer, took = asyncio.run(attack())
    assert took < SHORT_S + 7  # the shortened deadline, not the 10 s default
    assert "StreamStalled" in dropped(nodes, peer)["reason"]
    assert_healthy(nodes, a, b)


def test_a_stream_the_peer_resets_is_no_violation(nodes: NodeFactory, mesh: tuple[Node, Node]) -> None:
    """A peer that gives up on a stream half-way (a gateway whose client left) resets it: the node
    forgets the stream and keeps the peer."""
    a, b = mesh

    async def give_up() -> str:
        async with Session(a) as peer:
            assert peer.peer is not None and a.endpoint is not None
            await peer.send(HALF["a tunnel header"], end=False)
            writer = peer.writers[-1]
            stream_id = writer.get_extra_info("stream_id")
            node_side = a.endpoint._all
            await until(
                lambda: any(stream_id in library_internals.stream_readers(c) for c in list(node_side)),
                5,
                "the node to read the stream",
            )
            library_internals.abort_tunnel(writer)  # what a gateway does when its client leaves
            writer.transport._closing = True  # type: ignore[attr-defined]  # no FIN after the reset
            await until(lambda: a_logs.find("stream.broken", peer=peer.node_id), 5, "the reset seen")
            table = await peer.exchange(pack_stream_start(StreamKind.ROUTE_REQUEST, RouteRequest()))
            assert isinstance(table[-1], RouteTable) and peer.peer.closed_at is None
            return peer.node_id

    a_logs = nodes.logs["a"]
    peer = asyncio.run(give_up())
    assert not a_logs.find("peer.dropped", peer=peer)
    assert_healthy(nodes, a, b)


# -- 10,000 streams ----------------------------------------------------------------------------------------


STREAMS = 10_000


@pytest.mark.serial
def test_ten_thousand_streams_are_served_a_bounded_number_at_a_time(
    nodes: NodeFactory, mesh: tuple[Node, Node]
) -> None:
    """10,000 streams that each stall after half a frame: the node never holds more than QUIC's stream
    limit of them, and the first one's deadline drops the peer."""
    a, b = mesh
    assert a.endpoint is not None
    ep = a.endpoint
    most = 0

    async def attack() -> tuple[str, float]:
        nonlocal most
        async with Session(a) as hostile:
            baseline = len(ep._tasks)
            started = time.monotonic()
            for _ in range(STREAMS):
                await hostile.send(HALF["a control request"], end=False)
            while hostile.peer is not None and hostile.peer.closed_at is None:
                most = max(most, len(ep._tasks) - baseline)
                assert time.monotonic() - started < SHORT_S + 30, "never dropped"
                await asyncio.sleep(0.02)
            return hostile.node_id, hostile.peer.closed_at - started if hostile.peer.closed_at else 0.0

    peer, took = asyncio.run(attack())
    assert took < SHORT_S + 7  # the shortened deadline, not the 10 s default
    assert 0 < most <= 140, most  # aioquic's 128 streams, not 10,000
    assert "StreamStalled" in dropped(nodes, peer)["reason"]
    wait_until(lambda: not any(c.peer_id == peer for c in ep._all), 5, what="the connection forgotten")
    assert_healthy(nodes, a, b)


def test_a_peer_that_opens_more_streams_than_allowed_is_dropped(
    nodes: NodeFactory, mesh: tuple[Node, Node]
) -> None:
    """A peer that ignores QUIC's stream limit and opens 10,000 streams at once is closed by the
    protocol, and the log says so."""
    a, b = mesh

    async def attack() -> str:
        async with Session(a) as hostile:
            assert hostile.peer is not None
            hostile.peer._quic._remote_max_streams_bidi = STREAMS + 1  # as if the node had allowed it
            request = pack_stream_start(StreamKind.ROUTE_REQUEST, RouteRequest())
            for _ in range(STREAMS):
                await hostile.send(request)
            await hostile.closed_within(10)
            return hostile.node_id

    peer = asyncio.run(attack())
    assert "STREAM_LIMIT_ERROR" in dropped(nodes, peer)["reason"]
    assert_healthy(nodes, a, b)


# -- the fast path -----------------------------------------------------------------------------------------


def tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([fast_path.ALPN_FAST])
    return ctx


async def fast_session(a: Node, after_hello: bytes, role: str = "client") -> tuple[str, float, bytes]:
    """A fast-path connection with a genuine Hello, then ``after_hello``; (peer, seconds until the node
    closed it, what it answered)."""
    identity, hello = hostile_hello(a, role)
    reader, writer = await asyncio.open_connection("127.0.0.1", a.quic_port, ssl=tls_client())
    started = time.monotonic()
    writer.write(pack_frame(hello) + after_hello)
    got = await read_until_closed(reader, writer, SHORT_S + 10)
    return identity.node_id, time.monotonic() - started, got


FAST = {
    "garbage": (b"\x00\x00\x00\x03\xc1\xc1\xc1", "MalformedMessage"),
    "an unknown message": (b"\x00\x00\x00\x04\x91\xcd\x27\x0f", "UnknownTag"),
    "an oversized header": ((MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"), "MessageTooLarge"),
    "half a header then silence": (b"\x00\x00\x01\x00" + b"\x95" * 20, "StreamStalled"),
}


@pytest.mark.parametrize("case", list(FAST))
def test_the_fast_path_drops_an_admitted_peer_that_sends_no_header(
    nodes: NodeFactory, mesh: tuple[Node, Node], case: str
) -> None:
    a, b = mesh
    payload, why = FAST[case]
    peer, took, answer = asyncio.run(fast_session(a, payload))
    assert took < SHORT_S + 7  # the shortened deadline, not the 10 s default
    frames = FrameBuffer().feed(answer)
    assert len(frames) == 1 and isinstance(frames[0], Refused) and why in frames[0].reason, frames
    record = nodes.logs["a"].wait_for("peer.dropped", 5, peer=peer, path="fast")
    assert why in record["reason"]
    _, fast_guard = a.endpoint.quic_guard, a.endpoint.fast.guard  # type: ignore[union-attr]
    assert fast_guard is not None and not fast_guard.closed  # it was admitted: no pre-admission failure
    assert_healthy(nodes, a, b)
    # And the fast path still serves a well-formed tunnel header from the same kind of peer.
    request = TunnelRequest(model="nothing-here", method="GET", path="/v1/models", headers={}, body_bytes=0)
    _, _, answer = asyncio.run(fast_session(a, pack_frame(request)))
    assert isinstance(decode(answer[4 : 4 + int.from_bytes(answer[:4], "big")]), TunnelResponse)
