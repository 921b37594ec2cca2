"""After admission: what a node does with a peer that breaks the protocol, on purpose or by a bug.

Admission proves who a peer is, not that it behaves. An admitted peer (a client, a member) that sends
what no meshllm node sends must not cost this node more than the one stream it spoiled, and must not
keep its connection: it is *dropped* - its QUIC connection closed with the reason (after the Refused
frame on the stream had a moment to go out), ``peer.dropped`` logged with the peer, its role and the
reason. It may come back (its grant is still valid: that is the operator's call, ``meshllm revoke``);
every time, the same.

What drops a peer at once (:func:`drop_reason`) - no node of any meshllm version sends it:

- bytes that are not a message (not msgpack, wrong field types), or the wrong message for its stream;
- a frame whose length is over the cap (refused before any of it is buffered);
- a stream that ends inside a frame or before its kind byte;
- a stream that stalls before its request (control streams) or its header (tunnels) is complete: half
  a frame then silence - the stream is timed out, never held (:data:`STREAM_HEAD_TIMEOUT_S` for the
  kind byte and a tunnel's header, the control server's timeout for a whole control request).

What is only refused on its stream, and counted: a stream kind or a message tag this node does not
know, which a newer node might send. After :data:`UNKNOWN_STRIKES` of them on one connection the peer
is dropped as well. A stream the peer reset, or one cut because its connection closed, is nobody's
fault and costs nothing.

Streams at once: aioquic lets a peer hold at most 128 bidirectional streams open on a connection (it
grants one more as each finishes), so 10,000 streams opened at once are served 128 at a time, and a
peer that ignores the limit is closed by aioquic itself (STREAM_LIMIT_ERROR): that closure, and any
other QUIC protocol violation (:data:`PEER_FAULTS`), is logged as ``peer.dropped`` too.

On the TLS fast path a connection is one tunnel: a header that is not a message, over the cap, or not
complete within :data:`meshllm.net.fast_path.HEADER_TIMEOUT_S` closes it, logged the same way
(``path="fast"``).
"""

from __future__ import annotations

import asyncio

from aioquic.quic.packet import QuicErrorCode

from meshllm.wire.codec import CodecError, FieldTypeError, M, UnknownTag
from meshllm.wire.framing import StreamStalled, UnknownKind, read_frame

STREAM_HEAD_TIMEOUT_S = 10.0
"""From a stream's opening to its kind byte, and for a tunnel stream to its complete header frame: our
diallers send both in one write, so only a peer that means to hold the stream takes longer."""
UNKNOWN_STRIKES = 16
"""Streams of an unknown kind or message tag a connection may open before its peer is dropped."""
PEER_DROPPED = 0x1D0
"""The QUIC application error code a node closes a dropped peer's connection with."""
PEER_FAULTS = frozenset(
    {
        QuicErrorCode.FLOW_CONTROL_ERROR,
        QuicErrorCode.STREAM_LIMIT_ERROR,
        QuicErrorCode.STREAM_STATE_ERROR,
        QuicErrorCode.FINAL_SIZE_ERROR,
        QuicErrorCode.FRAME_ENCODING_ERROR,
        QuicErrorCode.PROTOCOL_VIOLATION,
    }
)
"""QUIC transport errors that mean the other side broke the protocol (aioquic closes the connection)."""


def drop_reason(exc: CodecError) -> str | None:
    """Why this failure of a stream from an admitted peer drops the peer at once; None when it is
    only refused on its stream (and counted: :data:`UNKNOWN_STRIKES`)."""
    if isinstance(exc, (UnknownKind, UnknownTag)):
        return None
    return f"{type(exc).__name__}: {exc}"


def quic_fault(error_code: int, frame_type: int | None, reason_phrase: str) -> str | None:
    """The reason to log when a connection ended with a QUIC protocol violation, else None (a normal
    close, an idle timeout, an application's close)."""
    if frame_type is None or error_code not in PEER_FAULTS:
        return None
    return f"QUIC {QuicErrorCode(error_code).name}: {reason_phrase or 'no reason given'}"


async def read_header(reader: asyncio.StreamReader, cls: type[M]) -> M:
    """A tunnel stream's header frame, within :data:`STREAM_HEAD_TIMEOUT_S` (StreamStalled if not)."""
    try:
        header = await asyncio.wait_for(read_frame(reader), STREAM_HEAD_TIMEOUT_S)
    except TimeoutError:
        raise StreamStalled(f"no complete {cls.__name__} within {STREAM_HEAD_TIMEOUT_S:g} s") from None
    if not isinstance(header, cls):
        raise FieldTypeError(f"expected {cls.__name__}, got {type(header).__name__}")
    return header
