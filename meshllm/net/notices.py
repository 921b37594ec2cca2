"""Death and leaving notices as they go down a node's connections, with the routing table for passive
nodes.

A member gets the notice alone: it has its own view of the mesh. A passive connection (a client or a
standby, which neither gossips nor probes) gets the notice followed by this node's routing table with
the node gone - what a route request would have answered a moment later - so the passive node need
not ask: a death used to make every passive node pull the table within two seconds, thousands of
route requests the active nodes took at once (``tests/bench/bench_passive.py --death``).

Both directions stay compatible: an older passive node reads the notice and leaves the table unread
on the stream; a newer one finds the stream of an older active node ends after the notice and pulls
as before.

Sending is paced (:data:`NOTICE_BATCH` streams, then the loop reads what came in): a notice to
thousands of connections in one go would keep the loop from reading its socket - the replies and a
member's probe answers would wait, and past the socket's buffer be dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from meshllm.wire.codec import MAX_MESSAGE_BYTES, CodecError, Message, decode_as
from meshllm.wire.framing import LENGTH, StreamKind, pack_frame, pack_stream_start, read_frame_as
from meshllm.wire.messages import Ack, RouteTable

if TYPE_CHECKING:
    from meshllm.net.connection import MeshConnection

NOTICE_BATCH = 8
"""Notice streams opened before the endpoint's loop gets a turn to read its sockets."""
PUSHED_ROUTES_WAIT_S = 2.0
"""How long a passive node waits, after a notice, for the table that may follow it (a newer node
sends both in one write; an older one ends the stream after the notice)."""


def notice_payloads(kind: StreamKind, notice: Message, routes: RouteTable | None) -> tuple[bytes, bytes]:
    """The bytes of a notice stream, packed once for every connection: (for members, for passive
    connections). The latter carries ``routes`` after the notice when there is a table to push."""
    plain = pack_stream_start(kind, notice)
    return plain, plain if routes is None else plain + pack_frame(routes)


async def send_notices(
    connections: Collection[MeshConnection],
    kind: StreamKind,
    notice: Message,
    routes: RouteTable | None,
    count_out: Callable[[StreamKind, bytes, int], None],
    ack_timeout: float | None = None,
) -> None:
    """One notice stream on each authenticated, open connection of ``connections``, packed once and
    sent in paced batches; passive connections get ``routes`` after it. With ``ack_timeout``, wait
    (that long at most) for every ack. ``count_out`` counts what was sent (the endpoint's counters)."""
    targets = [c for c in connections if c.authenticated.is_set() and not c.terminated]
    plain, pushed = notice_payloads(kind, notice, routes)
    acks: list[asyncio.Task[Any]] = []
    for i, conn in enumerate(targets):
        if i and i % NOTICE_BATCH == 0:
            await asyncio.sleep(0)  # let the loop read its sockets: replies, probes, requests
        if conn.terminated:
            continue
        data = pushed if conn.passive else plain
        try:
            reader, writer = await conn.create_stream()
            count_out(kind, data, 2 if data is not plain else 1)
            writer.write(data)
            writer.write_eof()
        except Exception:  # a connection closing under us: expected here
            continue
        if ack_timeout is not None:
            acks.append(asyncio.ensure_future(read_frame_as(reader, Ack)))
    if acks:
        done, pending = await asyncio.wait(acks, timeout=ack_timeout)
        for task in pending:
            task.cancel()
        for task in done:
            task.exception()  # failures to reach a peer are expected on shutdown/death


async def finish_introductions(connections: Collection[MeshConnection], timeout: float) -> None:
    """Before a leaving notice: wait (bounded) for the connections we dialled whose first exchange is
    in flight. The other side may have registered us already, and only an authenticated connection is
    told notices (a node that left just after joining was declared dead instead)."""
    waits = [
        asyncio.ensure_future(c.authenticated.wait())
        for c in connections
        if c.outbound and c.usable and c.auth_lock.locked() and not c.authenticated.is_set()
    ]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for task in pending:
            task.cancel()


async def read_pushed_routes(
    reader: asyncio.StreamReader, timeout: float = PUSHED_ROUTES_WAIT_S
) -> RouteTable | None:
    """The routing table that may follow a notice on its stream; None when the stream ends after the
    notice (an older sender), or what follows is not a whole table in time: the notice still counts,
    and the passive node asks for the table as it used to."""
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readexactly(LENGTH.size)
            (length,) = LENGTH.unpack(head)
            if length > MAX_MESSAGE_BYTES:
                return None
            body = await reader.readexactly(length)
        return decode_as(body, RouteTable)
    except (asyncio.IncompleteReadError, TimeoutError, CodecError):
        return None
