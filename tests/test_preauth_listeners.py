"""Both listeners before admission, driven as an attacker would: QUIC with Retry on, connections that
never say Hello, garbage, half frames and oversized frames on the fast path and on QUIC, and the
per-source caps with their queue - while a real client still gets through.

Each protection is checked where the attacker sees it (the connection closed, and when) and where the
operator does (the listener's guard counts, ``preauth.closed`` / ``auth.refused`` in the log)."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import ssl
import statistics
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from meshllm.net import library_internals
from meshllm.net.endpoint import ALPN
from meshllm.net.preauth import AUTH_DEADLINE_S, MAX_HELLO_BYTES, MAX_PREAUTH_BYTES, Limits
from meshllm.net.preauth_guard import PreAuthGuard
from meshllm.node import Node
from meshllm.wire.codec import Message
from meshllm.wire.framing import StreamKind, pack_frame, read_frame
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.messages import Refused, RpcTunnelRequest
from tests.support import NodeFactory, read_until_closed, until, wait_until
from tests.test_capabilities import client_of, hello_from

pytestmark = pytest.mark.serial  # floods the node on purpose: alone, not beside other tests

ATTACKER = "127.0.0.2"  # another loopback address: the real nodes all come from 127.0.0.1
SMALL = Limits(per_source=2, total=8, queue_per_source=2, queue_total=8, queue_wait_s=5.0)


def quic_config() -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)


class Idle(QuicConnectionProtocol):
    """A raw QUIC connection from a chosen source address: when its handshake ended, when it closed."""

    def __init__(self, quic: QuicConnection, **kw: Any) -> None:
        super().__init__(quic, **kw)
        self.started = time.monotonic()
        self.handshake_s: float | None = None
        self.closed_s: float | None = None

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.handshake_s = time.monotonic() - self.started
        elif isinstance(event, events.ConnectionTerminated) and self.closed_s is None:
            self.closed_s = time.monotonic() - self.started
        super().quic_event_received(event)


async def open_idle(port: int, source: str = ATTACKER) -> tuple[Idle, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    proto = Idle(QuicConnection(configuration=quic_config()))
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(source, 0))
    proto.connect(("127.0.0.1", port))
    return proto, transport


def guards(a: Node) -> tuple[PreAuthGuard[Any], PreAuthGuard[Any]]:
    assert a.endpoint is not None and a.endpoint.quic_guard is not None and a.endpoint.fast.guard
    return a.endpoint.quic_guard, a.endpoint.fast.guard


def run_on(node: Node, coro: Awaitable[Any], timeout: float = 30) -> Any:
    assert node.endpoint is not None
    return node.endpoint.loop_thread.run(coro, timeout=timeout)  # type: ignore[arg-type]


# -- QUIC --------------------------------------------------------------------------------------------------


async def _handshake_ms(port: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        async with connect("127.0.0.1", port, configuration=quic_config()):
            out.append((time.perf_counter() - started) * 1000)
    return out


async def _retry_cost(identity: NodeIdentity, n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    medians = []
    for retry in (False, True):
        config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        config.certificate, config.private_key = identity.certificate(), identity.private_key
        transport, _ = await loop.create_datagram_endpoint(
            functools.partial(QuicServer, configuration=config, retry=retry), local_addr=("127.0.0.1", 0)
        )
        try:
            medians.append(statistics.median(await _handshake_ms(transport.get_extra_info("sockname")[1], n)))
        finally:
            transport.close()
    return medians[0], medians[1]


def test_quic_retry_is_on_and_costs_one_round_trip(nodes: NodeFactory, tmp_path: Any) -> None:
    a = nodes.start("a")
    assert a.endpoint is not None and a.endpoint._server is not None
    assert library_internals.retry_enabled(a.endpoint._server)
    # A first Initial is answered with a Retry, statelessly: no connection is created for it.
    client = QuicConnection(configuration=quic_config())
    client.connect(("127.0.0.1", a.quic_port), now=time.monotonic())
    (initial, _), *_ = client.datagrams_to_send(now=time.monotonic())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(initial, ("127.0.0.1", a.quic_port))
        reply, _ = s.recvfrom(2048)
    assert pull_quic_header(Buffer(data=reply), host_cid_length=8).packet_type == QuicPacketType.RETRY
    quic_guard, _ = guards(a)
    assert quic_guard.counts()["held"] == 0 and not quic_guard.limiter.counts["admitted"]
    # Members and clients still meet (their dialler follows the Retry).
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, 15, what="a and b to meet")
    client_of(nodes, a)
    plain, with_retry = asyncio.run(_retry_cost(NodeIdentity.load_or_create(tmp_path / "id"), 30))
    print(f"\nQUIC handshake on loopback, median of 30: {plain:.2f} ms plain, {with_retry:.2f} ms with Retry")
    assert with_retry < plain + 50


def test_a_quic_connection_that_never_says_hello_is_closed_at_the_deadline(nodes: NodeFactory) -> None:
    a = nodes.start("a")

    async def idle() -> Idle:
        proto, transport = await open_idle(a.quic_port)
        try:
            await until(lambda: proto.closed_s is not None, AUTH_DEADLINE_S + 5, "the node to close it")
        finally:
            transport.close()
        return proto

    proto = asyncio.run(idle())
    assert proto.handshake_s is not None and proto.closed_s is not None
    assert AUTH_DEADLINE_S - 0.5 < proto.closed_s < AUTH_DEADLINE_S + 3
    quic_guard, _ = guards(a)
    wait_until(
        lambda: quic_guard.closed["deadline"] == 1 and quic_guard.counts()["held"] == 0, 5, what="count"
    )
    nodes.logs["a"].wait_for("preauth.closed", 5, listener="quic", why="deadline", source=ATTACKER)
    client_of(nodes, a)  # the node is fine


def test_unauthenticated_quic_connections_are_capped_per_source_and_queued(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    quic_guard, _ = guards(a)
    quic_guard.limiter.limits = SMALL

    async def flood() -> tuple[list[Idle], dict[str, int]]:
        opened = [await open_idle(a.quic_port) for _ in range(5)]
        protos = [p for p, _ in opened]
        try:
            await until(lambda: sum(p.handshake_s is not None for p in protos) == 2, 5, "2 handshakes")
            await until(lambda: quic_guard.limiter.queued == 2, 5, "2 queued")
            assert quic_guard.limiter.held_by(ATTACKER) == 2
            # A real client, from another address, is not held back.
            started = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, client_of, nodes, a)
            assert time.monotonic() - started < 10
            assert sum(p.handshake_s is not None for p in protos) == 2
            # At the deadline the first two are closed and the queued two get their turn.
            await until(lambda: sum(p.handshake_s is not None for p in protos) == 4, AUTH_DEADLINE_S + 4, "4")
            await until(lambda: sum(p.closed_s is not None for p in protos) >= 2, 5, "the first 2 closed")
            # Counted before the attacker closes the rest: the node frees a slot as soon as the close
            # arrives, and the attempt still queued would take it.
            counts = dict(quic_guard.limiter.counts)
        finally:
            for proto, transport in opened:
                proto.close()
                transport.close()
        return protos, counts

    protos, counts = asyncio.run(flood())
    assert counts["admitted"] >= 3 and counts["admitted_from_queue"] == 2  # a's client took one too
    assert counts["refused_source_queue_full"] >= 1  # the fifth (and its retransmissions)
    assert min(p.closed_s for p in protos if p.closed_s is not None) > AUTH_DEADLINE_S - 0.5


async def _quic_stream(port: int, chunks: list[bytes], streams: int = 1) -> tuple[float, list[Message]]:
    """Send ``chunks`` on ``streams`` streams of one raw connection; (seconds until the node closed
    the connection, the frames of the first stream's answer)."""
    proto, transport = await open_idle(port, "127.0.0.1")
    try:
        await until(lambda: proto.handshake_s is not None, 5, "handshake")
        started = time.monotonic()
        readers = []
        for _ in range(streams):
            reader, writer = await proto.create_stream()
            for chunk in chunks:
                writer.write(chunk)
            readers.append(reader)
        frames: list[Message] = []
        try:
            frames.append(await asyncio.wait_for(read_frame(readers[0]), AUTH_DEADLINE_S + 3))
        except Exception:
            pass
        await until(lambda: proto.closed_s is not None, AUTH_DEADLINE_S + 5, "the node to close it")
        return time.monotonic() - started, frames
    finally:
        transport.close()


def test_quic_oversized_frames_and_excess_bytes_before_hello_close_the_connection(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    quic_guard, _ = guards(a)
    # A length prefix over the pre-admission cap: refused before any of it is buffered, closed now.
    head = bytes([StreamKind.ROUTE_REQUEST]) + (MAX_HELLO_BYTES + 1).to_bytes(4, "big")
    took, _ = asyncio.run(_quic_stream(a.quic_port, [head]))
    assert took < AUTH_DEADLINE_S - 1
    wait_until(lambda: quic_guard.closed["garbage"] == 1, 5, what="the oversized frame counted")
    # Allowed lengths, never completed, on many streams: more bytes than a Hello needs close it too.
    part = bytes([StreamKind.ROUTE_REQUEST]) + MAX_HELLO_BYTES.to_bytes(4, "big") + b"\0" * 10_000
    took, _ = asyncio.run(_quic_stream(a.quic_port, [part], streams=MAX_PREAUTH_BYTES // 10_000 + 2))
    assert took < AUTH_DEADLINE_S - 1
    record = nodes.logs["a"].wait_for(
        "stream.rejected", 5, listener="quic", why="garbage", source="127.0.0.1"
    )
    assert record["counts"]["closed_garbage"] >= 1
    wait_until(lambda: quic_guard.closed["garbage"] == 2, 5, what="the excess bytes counted")
    client_of(nodes, a)


# -- fast path ---------------------------------------------------------------------------------------------


def tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["meshllm-fast/1"])
    return ctx


async def _tcp(port: int, send: list[bytes], tls: bool, source: str = ATTACKER) -> tuple[float, bytes]:
    """Connect (TLS or not), send, then read until the node closes; (seconds to close, bytes read)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        if tls:
            await writer.start_tls(tls_client())
        for chunk in send:
            writer.write(chunk)
    except (ConnectionError, ssl.SSLError):
        writer.close()
        return time.monotonic() - started, b""
    got = await read_until_closed(reader, writer, AUTH_DEADLINE_S + 5)
    return time.monotonic() - started, got


@pytest.mark.parametrize(
    ("case", "tls", "send", "why", "at_deadline"),
    [
        ("silent", False, [], "deadline", True),
        ("garbage before TLS", False, [os.urandom(600)], "garbage", False),
        ("garbage after TLS", True, [b"\x00\x00\x00\x05hello"], "garbage", False),
        ("half a frame then silence", True, [b"\x00\x00\x01\x00" + b"\x81" * 40], "deadline", True),
        ("an oversized frame", True, [(1 << 20).to_bytes(4, "big")], "garbage", False),
    ],
)
def test_bad_input_on_the_fast_path_before_hello(
    nodes: NodeFactory, case: str, tls: bool, send: list[bytes], why: str, at_deadline: bool
) -> None:
    a = nodes.start("a")
    _, fast_guard = guards(a)
    took, _ = asyncio.run(_tcp(a.quic_port, send, tls))
    if at_deadline:
        assert AUTH_DEADLINE_S - 0.5 < took < AUTH_DEADLINE_S + 3, case
    else:
        assert took < AUTH_DEADLINE_S - 1, case
    wait_until(lambda: fast_guard.closed[why] == 1 and fast_guard.counts()["held"] == 0, 5, what=why)
    event = "stream.rejected" if why == "garbage" else "preauth.closed"
    nodes.logs["a"].wait_for(event, 5, listener="fast", why=why, source=ATTACKER)
    assert_fast_path_answers(nodes, a)


def assert_fast_path_answers(nodes: NodeFactory, a: Node, within_s: float = 5.0) -> None:
    """A real client's fast-path connection is admitted and answered (here: refused, as a client may
    not open RPC tunnels - proof that its Hello was read and verified)."""
    c = nodes.nodes[-1] if nodes.nodes[-1] is not a else client_of(nodes, a)
    assert c.endpoint is not None

    async def attempt() -> Message:
        assert c.endpoint is not None
        reader, writer = await c.endpoint.fast.open(a.node_id, a.addrs, RpcTunnelRequest(model="any"))
        try:
            return await asyncio.wait_for(read_frame(reader), 10)
        finally:
            writer.close()

    started = time.monotonic()
    answer = run_on(c, attempt())
    assert answer == Refused(reason="RpcTunnelRequest is for members only: this connection is client")
    assert time.monotonic() - started < within_s


def test_garbage_after_the_hello_on_the_fast_path(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    hello = pack_frame(hello_from(c, a, "client"))
    took, _ = asyncio.run(_tcp(a.quic_port, [hello, b"\x00\x00\x00\x03abc"], tls=True, source="127.0.0.1"))
    assert took < AUTH_DEADLINE_S
    nodes.logs["a"].wait_for("peer.dropped", 5, kind="FAST", peer=c.node_id)
    _, fast_guard = guards(a)
    assert fast_guard.counts()["held"] == 0 and not fast_guard.closed  # it was admitted
    assert_fast_path_answers(nodes, a)


def test_unauthenticated_fast_path_connections_are_capped_per_source_and_queued(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    client_of(nodes, a)
    _, fast_guard = guards(a)
    fast_guard.limiter.limits = SMALL

    async def flood() -> list[tuple[float, bytes]]:
        tasks = [asyncio.ensure_future(_tcp(a.quic_port, [], tls=False)) for _ in range(5)]
        # Counters, not the live queue: on a loaded machine the first two may reach their deadline
        # (and the queued two their turn) before a poll sees the queue full.
        counts = fast_guard.limiter.counts
        await until(lambda: counts["admitted"] >= 2 and counts["queued"] >= 2, 10, "2 held and 2 queued")
        # The real client, from 127.0.0.1, is answered at once.
        await asyncio.get_running_loop().run_in_executor(None, assert_fast_path_answers, nodes, a, 2.0)
        return await asyncio.gather(*tasks)

    took = sorted(t for t, _ in asyncio.run(flood()))
    assert took[0] < 1.0  # the fifth: refused at once
    counts = fast_guard.limiter.counts
    assert counts["refused_source_queue_full"] == 1 and counts["admitted_from_queue"] == 2
    assert took[-1] < 2 * AUTH_DEADLINE_S + 3  # the queued two: their own deadline after the first two
    nodes.logs["a"].wait_for("preauth.closed", 5, listener="fast", why="refused", source=ATTACKER)
