"""Tests for the wire vocabulary: meshllm.wire.codec, meshllm.wire.messages and meshllm.wire.framing.

Every catalog message round-trips with hypothesis values built from its type hints; bad payloads are
rejected with the right typed error and nothing else; frames survive arbitrary chunking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import types
import typing
from typing import Any, Union

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshllm.wire.invite
from meshllm.wire import codec
from meshllm.wire.codec import (
    MAX_MESSAGE_BYTES,
    CodecError,
    FieldTypeError,
    MalformedMessage,
    Message,
    MessageTooLarge,
    UnknownTag,
    catalog,
    decode,
    decode_as,
    encode,
)
from meshllm.wire.framing import (
    LENGTH,
    FrameBuffer,
    FrameError,
    PeerRefused,
    StreamKind,
    pack_frame,
    pack_stream_start,
    parse_kind,
    read_frame,
    read_frame_as,
)
from meshllm.wire.messages import (
    Ack,
    Gossip,
    GossipReceived,
    GpuReport,
    Hello,
    JoinMesh,
    PeerAnnouncement,
    PeerDown,
    PeerDownReceived,
    PeerJoined,
    PeerStatus,
    ProbeResult,
    Refused,
    RouteSnapshot,
    RouteTable,
    Seed,
    StatusReply,
    Tick,
    TransportStats,
)
from tests.support import fed_reader

FAST = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# -- strategies from type hints -------------------------------------------------------------------------

INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
FLOATS = st.floats(allow_nan=False)
TEXT = st.text(max_size=12)
BYTES = st.binary(max_size=24)


def strategy_for(hint: Any) -> st.SearchStrategy[Any]:
    """A hypothesis strategy producing values the codec must accept for ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return INTS
    if hint is float:
        return FLOATS
    if hint is str:
        return TEXT
    if hint is bytes:
        return BYTES
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        assert len(options) == 1, hint
        return st.none() | strategy_for(options[0])
    if origin is tuple:
        assert len(args) == 2 and args[1] is Ellipsis, hint
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=3)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return struct_strategy(hint)
    raise AssertionError(f"no strategy for {hint!r}")


def struct_strategy(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)}
    return st.builds(cls, **fields)


CATALOG = sorted(catalog().items())


def test_catalog_is_nonempty_and_tags_unique() -> None:
    cat = catalog()
    assert len(cat) >= 20
    assert all(tag == cls.TAG for tag, cls in cat.items())
    classes = list(cat.values())
    assert len(set(classes)) == len(classes)
    tags = [cls.TAG for cls in classes]
    assert len(set(tags)) == len(tags)
    assert Hello in classes and meshllm.wire.invite.InviteToken in classes
    # Nested structs travel untagged and must not be in the catalog.
    assert PeerAnnouncement not in classes and Seed not in classes and PeerStatus not in classes


def test_catalog_is_a_copy() -> None:
    cat = catalog()
    cat[999_999] = Ack
    assert 999_999 not in catalog()


def test_reusing_a_tag_is_refused() -> None:
    with pytest.raises(RuntimeError, match="tag 1"):

        @codec.message(1)
        @dataclasses.dataclass(frozen=True)
        class Impostor:
            x: int


def test_registering_a_non_dataclass_is_refused() -> None:
    with pytest.raises(RuntimeError, match="dataclass"):

        @codec.message(987_654)
        class NotData:
            pass

    assert 987_654 not in catalog()  # a failed registration leaves nothing behind


@pytest.mark.parametrize("tag,cls", CATALOG, ids=[cls.__name__ for _, cls in CATALOG])
def test_every_message_round_trips(tag: int, cls: type[Message]) -> None:
    @FAST
    @given(struct_strategy(cls))
    def check(msg: Message) -> None:
        data = encode(msg)
        assert isinstance(data, bytes)
        back = decode(data)
        assert type(back) is cls
        assert back == msg
        assert decode_as(data, cls) == msg
        assert msgpack.unpackb(data)[0] == tag

    check()


@FAST
@given(struct_strategy(Gossip))
def test_gossip_frames_round_trip(msg: Gossip) -> None:
    back = decode(encode(msg))
    assert isinstance(back, Gossip)
    assert all(isinstance(a, PeerAnnouncement) for a in back.announcements)
    assert all(isinstance(a.addrs, tuple) for a in back.announcements)
    assert back == msg


def test_nested_structs_decode_as_dataclasses() -> None:
    ann = PeerAnnouncement("n1", "a", "active", ("127.0.0.1:1",), 5, ("m",), (), 2, 3)
    msg = GossipReceived("p", (ann,))
    assert decode(encode(msg)) == msg
    join = JoinMesh((Seed("s", ("h:1", "h:2")),))
    back = decode(encode(join))
    assert back == join and isinstance(back.seeds[0], Seed)  # type: ignore[attr-defined]
    status = StatusReply("n", "name", "active", 1, (PeerStatus("p", "b", "active", 2, (), ("m",), 1.5),))
    assert decode(encode(status)) == status
    down = PeerDownReceived(PeerDown("x", 3, "y"), "z")
    assert decode(encode(down)) == down


# -- rejections -----------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_codec_errors(data: bytes) -> None:
    try:
        decode(data)
    except CodecError:
        pass


def _plausible_payloads() -> st.SearchStrategy[bytes]:
    """Well-formed msgpack arrays with a real tag and junk fields: reach the field checks."""
    leaf = st.none() | st.booleans() | INTS | FLOATS | TEXT | BYTES
    values = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
        max_leaves=12,
    )
    tags = st.sampled_from([t for t, _ in CATALOG])
    return st.builds(
        lambda t, fs: msgpack.packb([t, *fs], use_bin_type=True), tags, st.lists(values, max_size=9)
    )


@settings(max_examples=400, deadline=None, derandomize=True)
@given(_plausible_payloads())
def test_junk_fields_raise_only_codec_errors(data: bytes) -> None:
    try:
        msg = decode(data)
    except CodecError:
        return
    # Whatever got through must re-encode to something that decodes to the same value.
    assert decode(encode(msg)) == msg


def pack(*items: Any) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def test_unknown_tag() -> None:
    with pytest.raises(UnknownTag, match="424242"):
        decode(pack(424242, "x"))
    with pytest.raises(UnknownTag):
        decode(pack(-1))


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb(5),
        msgpack.packb("hello"),
        msgpack.packb({"tag": 1}),
        msgpack.packb(None),
        msgpack.packb([]),
        pack("1", "reason"),
        pack(1.0, "reason"),
        pack(True),
        pack(None),
        pack(b"\x02", "reason"),
        pack([2], "reason"),
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x02",  # array of 2 with one element
        pack(2, "reason") + b"\x00",  # trailing bytes
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(data)


def test_malformed_names_the_problem() -> None:
    with pytest.raises(MalformedMessage, match="tag must be an integer"):
        decode(pack("x"))
    with pytest.raises(MalformedMessage, match="expected"):
        decode(msgpack.packb([]))


@pytest.mark.parametrize(
    "data,where",
    [
        (pack(Refused.TAG), "fields"),  # missing field
        (pack(Refused.TAG, "a", "b"), "fields"),  # surplus field
        (pack(Ack.TAG, 1), "fields"),
        (pack(Refused.TAG, 5), "reason"),  # int where str
        (pack(Refused.TAG, b"x"), "reason"),  # bytes where str
        (pack(Refused.TAG, None), "reason"),  # None where str
        (pack(Tick.TAG, ["t"]), "name"),
        (pack(PeerDown.TAG, "n", "3", "r"), "incarnation"),  # str where int
        (pack(PeerDown.TAG, "n", True, "r"), "incarnation"),  # bool where int
        (pack(PeerDown.TAG, "n", 1.0, "r"), "incarnation"),  # float where int
        (pack(Hello.TAG, "m", "n", 7, "active", "t", b"n", b"m", b"s"), "public_key"),  # int where bytes
        (pack(Hello.TAG, "m", "n", "pk", "active", "t", b"n", b"m", b"s"), "public_key"),  # str where bytes
        (pack(ProbeResult.TAG, "n", 1, 1.0, ""), "ok"),  # int where bool
        (pack(ProbeResult.TAG, "n", True, "1.0", ""), "rtt_ms"),  # str where float
        (pack(ProbeResult.TAG, "n", True, False, ""), "rtt_ms"),  # bool where float
        (pack(Gossip.TAG, "not a list"), "announcements"),
        (pack(Gossip.TAG, [["n", "a", "active"]]), "announcements"),  # nested struct too short
        (
            pack(Gossip.TAG, [["n", "a", "active", [], "big", [], [], 0, 0, [], False]]),
            "vram_bytes",
        ),  # nested wrong
        (
            pack(Gossip.TAG, [["n", "a", "active", "addr", 1, [], [], 0, 0, [], False]]),
            "addrs",
        ),  # str where tuple
        (pack(Gossip.TAG, ["flat"]), "announcements"),  # nested struct not an array
        (pack(PeerJoined.TAG, {"node_id": "n"}), "peer"),  # map where struct
        (pack(JoinMesh.TAG, [["s", [1]]]), "addrs"),  # int inside tuple[str, ...]
        (pack(PeerDownReceived.TAG, ["x", 1], "z"), "notice"),
        (pack(TransportStats.TAG, 1, 0, {"a": "1"}, {}, {}, 0), "bytes_sent"),  # wrong dict value
        (pack(TransportStats.TAG, 1, 0, [], {}, {}, 0), "bytes_sent"),  # list where map
        (pack(TransportStats.TAG, 1, 0, {b"k": 1}, {}, {}, 0), "bytes_sent"),  # bytes key where str
        (pack(Refused.TAG, msgpack.ExtType(5, b"x")), "reason"),  # extension type
        (pack(Refused.TAG, msgpack.Timestamp(1, 0)), "reason"),
        (pack(Gossip.TAG, [msgpack.ExtType(5, b"x")]), "announcements"),
    ],
)
def test_field_type_errors(data: bytes, where: str) -> None:
    with pytest.raises(FieldTypeError) as info:
        decode(data)
    assert where in str(info.value)


def test_ints_are_accepted_for_float_fields() -> None:
    msg = decode(pack(ProbeResult.TAG, "n", True, 3, "e"))
    assert isinstance(msg, ProbeResult)
    assert msg.rtt_ms == 3.0 and type(msg.rtt_ms) is float
    big = decode(pack(ProbeResult.TAG, "n", False, 2**64 - 1, ""))
    assert isinstance(big, ProbeResult) and type(big.rtt_ms) is float
    status = decode(
        pack(StatusReply.TAG, "n", "x", "active", 0, [["p", "b", "active", 1, [], [], 7, []]], [])
    )
    assert isinstance(status, StatusReply)
    assert status.peers[0].last_seen_s == 7.0 and type(status.peers[0].last_seen_s) is float


def test_float_specials_round_trip() -> None:
    for value in (math.inf, -math.inf, -0.0, 5e-324):
        msg = ProbeResult("n", True, value)
        back = decode(encode(msg))
        assert isinstance(back, ProbeResult)
        assert back.rtt_ms == value and math.copysign(1, back.rtt_ms) == math.copysign(1, value)


def test_payload_over_the_cap() -> None:
    data = encode(Refused("x" * 100))
    with pytest.raises(MessageTooLarge):
        decode(data, max_bytes=len(data) - 1)
    assert decode(data, max_bytes=len(data)) == Refused("x" * 100)
    with pytest.raises(MessageTooLarge):
        decode_as(data, Refused, max_bytes=10)
    # The cap applies before parsing: junk over the cap is "too large", not "malformed".
    with pytest.raises(MessageTooLarge):
        decode(b"\xc1" * 11, max_bytes=10)


def test_encode_refuses_messages_over_the_global_cap() -> None:
    with pytest.raises(MessageTooLarge):
        encode(Refused("x" * (MAX_MESSAGE_BYTES + 1)))


def test_decode_as_wrong_type() -> None:
    with pytest.raises(FieldTypeError, match="expected Tick, got Refused"):
        decode_as(encode(Refused("no")), Tick)


# -- framing --------------------------------------------------------------------------------------------

FRAME_MESSAGES = st.one_of(
    struct_strategy(Tick),
    struct_strategy(Refused),
    struct_strategy(PeerDown),
    struct_strategy(Gossip),
    struct_strategy(Ack),
    struct_strategy(ProbeResult),
)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[list[Message], list[bytes]]:
    msgs = draw(st.lists(FRAME_MESSAGES, min_size=0, max_size=5))
    stream = b"".join(pack_frame(m) for m in msgs)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[prev:cut])
        prev = cut
    return msgs, pieces


@settings(max_examples=80, deadline=None, derandomize=True)
@given(chunked())
def test_frame_buffer_round_trips_any_split(case: tuple[list[Message], list[bytes]]) -> None:
    msgs, pieces = case
    buf = FrameBuffer()
    out: list[Message] = []
    for piece in pieces:
        out.extend(buf.feed(piece))
    assert out == msgs
    assert buf.pending == 0


def test_frame_buffer_byte_by_byte_and_pending() -> None:
    frame = pack_frame(Tick("t"))
    buf = FrameBuffer()
    for i, b in enumerate(frame[:-1]):
        assert buf.feed(bytes([b])) == []
        assert buf.pending == i + 1
    assert buf.feed(frame[-1:]) == [Tick("t")]
    assert buf.pending == 0


def test_frame_buffer_refuses_large_length_before_body() -> None:
    buf = FrameBuffer(max_bytes=100)
    with pytest.raises(MessageTooLarge):
        buf.feed(LENGTH.pack(101))  # only the header: nothing of the body has arrived
    buf = FrameBuffer()
    with pytest.raises(MessageTooLarge):
        buf.feed(LENGTH.pack(MAX_MESSAGE_BYTES + 1))
    # Exactly at the cap is a length it waits for.
    buf = FrameBuffer(max_bytes=100)
    assert buf.feed(LENGTH.pack(100) + b"\x00" * 10) == []


def test_frame_buffer_bad_body_is_a_codec_error() -> None:
    body = pack(424242)
    with pytest.raises(UnknownTag):
        FrameBuffer().feed(LENGTH.pack(len(body)) + body)


def test_pack_stream_start() -> None:
    data = pack_stream_start(StreamKind.GOSSIP, Tick("a"), Ack())
    assert parse_kind(data[:1]) is StreamKind.GOSSIP
    assert FrameBuffer().feed(data[1:]) == [Tick("a"), Ack()]
    assert pack_stream_start(StreamKind.PEER_DOWN) == bytes([StreamKind.PEER_DOWN])


def test_stream_kinds_are_distinct_bytes() -> None:
    values = [k.value for k in StreamKind]
    assert len(set(values)) == len(values)
    assert all(0 < v < 256 for v in values)
    for kind in StreamKind:
        assert parse_kind(bytes([kind])) is kind


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff", bytes([max(StreamKind) + 1]), b"\x01\x01"])
def test_parse_kind_rejects(data: bytes) -> None:
    with pytest.raises(FrameError):
        parse_kind(data)



def _read(data: bytes, **kwargs: Any) -> Message:
    async def go() -> Message:
        return await read_frame(fed_reader(data), **kwargs)

    return asyncio.run(go())


def _read_as(data: bytes, cls: type[Any]) -> Any:
    async def go() -> Any:
        return await read_frame_as(fed_reader(data), cls)

    return asyncio.run(go())


def test_read_frame_good() -> None:
    assert _read(pack_frame(Tick("x"))) == Tick("x")

    async def two() -> list[Message]:
        reader = fed_reader(pack_frame(Tick("a")) + pack_frame(Refused("b")))
        return [await read_frame(reader), await read_frame(reader)]

    assert asyncio.run(two()) == [Tick("a"), Refused("b")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",  # half a length
        LENGTH.pack(10) + b"\x91",  # body shorter than its length
        pack_frame(Tick("abc"))[:-1],
    ],
)
def test_read_frame_truncated(data: bytes) -> None:
    with pytest.raises(FrameError):
        _read(data)


def test_read_frame_oversized_length_before_body() -> None:
    async def go() -> None:
        reader = fed_reader(LENGTH.pack(1000), eof=False)  # body never comes; must not wait for it
        await asyncio.wait_for(read_frame(reader, max_bytes=100), timeout=5)

    with pytest.raises(MessageTooLarge):
        asyncio.run(go())


def test_read_frame_bad_body() -> None:
    body = b"\xc1"
    with pytest.raises(MalformedMessage):
        _read(LENGTH.pack(len(body)) + body)


def test_read_frame_as() -> None:
    assert _read_as(pack_frame(Tick("x")), Tick) == Tick("x")
    with pytest.raises(PeerRefused) as info:
        _read_as(pack_frame(Refused("wrong mesh")), Hello)
    assert info.value.reason == "wrong mesh"
    assert "wrong mesh" in str(info.value)
    with pytest.raises(FieldTypeError, match="expected Hello, got Tick"):
        _read_as(pack_frame(Tick("x")), Hello)
    # Asking for Refused itself returns it rather than raising.
    assert _read_as(pack_frame(Refused("r")), Refused) == Refused("r")
    with pytest.raises(FrameError):
        _read_as(b"\x00", Tick)


def test_frame_error_is_a_codec_error() -> None:
    assert issubclass(FrameError, CodecError)
    for err in (MalformedMessage, UnknownTag, FieldTypeError, MessageTooLarge):
        assert issubclass(err, CodecError)


def test_the_wire_form_is_the_fields_in_order_with_nested_structs_as_arrays() -> None:
    """Pinned bytes: signatures cover encoded messages (a grant inside a Hello's signed payload), so
    the encoding of a nested message must never change, whatever the encoder does inside."""
    gpu = GpuReport(name="g", total_bytes=8, free_bytes=4)
    ann = PeerAnnouncement(
        node_id="n", name="a", role="active", addrs=("x:1",), vram_bytes=8, demand={"m": 1.5}, gpus=(gpu,)
    )
    expected = pack(
        Gossip.TAG,
        [
            ["n", "a", "active", ["x:1"], 8, [], [], 0, 0, [], False, [], {"m": 1.5}, [], {},
             [["g", 8, 4]], b"", b"", {}],
        ],
    )  # fmt: skip
    assert codec.encode(Gossip(announcements=(ann,))) == expected
    assert codec.decode(expected) == Gossip(announcements=(ann,))
    routes = RouteSnapshot(table=RouteTable(models=(), unserved=("u",), actives=()), own_id="me")
    assert codec.encode(routes) == pack(RouteSnapshot.TAG, [[], ["u"], [], [], {}, [], []], "me", {}, {})
