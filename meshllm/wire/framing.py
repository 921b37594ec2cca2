"""Stream framing: the kind byte that opens every stream, and length-prefixed msgpack frames.

A control stream is ``[kind byte][u32 length][msgpack]...``; a tunnel stream is the kind byte, one
frame of header, then raw bytes. Lengths over the cap are refused before any byte is buffered.
"""

from __future__ import annotations

import asyncio
import enum
import struct

from meshllm.wire.codec import (
    MAX_MESSAGE_BYTES,
    CodecError,
    FieldTypeError,
    M,
    Message,
    MessageTooLarge,
    decode,
    encode,
)
from meshllm.wire.messages import Refused

LENGTH = struct.Struct(">I")


class StreamKind(enum.IntEnum):
    """The first byte of every bidirectional stream. Never reuse a value."""

    GOSSIP = 1
    ROUTE_REQUEST = 2
    HTTP_TUNNEL = 3
    RPC_TUNNEL = 4
    PEER_DOWN = 5
    PEER_LEAVING = 6
    REVOCATION = 7


class FrameError(CodecError):
    """A stream broke the framing rules (bad kind, truncated frame, oversized length)."""


class UnknownKind(FrameError):
    """The stream's kind byte names no kind this node knows (a newer node's, perhaps)."""


class StreamStalled(FrameError):
    """The other side stopped sending before its request (or tunnel header) was complete."""


def pack_frame(msg: Message) -> bytes:
    """One length-prefixed frame."""
    body = encode(msg)
    return LENGTH.pack(len(body)) + body


def pack_stream_start(kind: StreamKind, *msgs: Message) -> bytes:
    """The kind byte followed by frames."""
    return bytes([kind]) + b"".join(pack_frame(m) for m in msgs)


def parse_kind(byte: bytes) -> StreamKind:
    if len(byte) != 1:
        raise FrameError("stream ended before its kind byte")
    try:
        return StreamKind(byte[0])
    except ValueError:
        raise UnknownKind(f"unknown stream kind {byte[0]}") from None


class FrameBuffer:
    """Incremental frame parser for code that receives bytes in pieces (pure, no I/O)."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self._buf)
            if length > self._max:
                raise MessageTooLarge(f"frame length {length} over cap {self._max}")
            if len(self._buf) < LENGTH.size + length:
                break
            body = bytes(self._buf[LENGTH.size : LENGTH.size + length])
            del self._buf[: LENGTH.size + length]
            out.append(decode(body, self._max))
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Read one frame; raises FrameError on EOF mid-frame or an oversized length."""
    try:
        head = await reader.readexactly(LENGTH.size)
        (length,) = LENGTH.unpack(head)
        if length > max_bytes:
            raise MessageTooLarge(f"frame length {length} over cap {max_bytes}")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"stream ended inside a frame ({len(exc.partial)} bytes read)") from None
    return decode(body, max_bytes)


class PeerRefused(Exception):
    """The other side answered with a Refused frame; ``reason`` is what it said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def read_frame_as(reader: asyncio.StreamReader, cls: type[M], max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Read one frame of an expected type; a Refused frame raises PeerRefused."""
    msg = await read_frame(reader, max_bytes)
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, Refused):
        raise PeerRefused(msg.reason)
    raise FieldTypeError(f"expected {cls.__name__}, got {type(msg).__name__}")
