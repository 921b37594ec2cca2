"""Every decoder that reads what a peer, a file or a user hands a node, as fuzz targets.

Each target takes bytes (or text) from hypothesis and feeds it to one decoder; the decoder may answer
or raise its own typed error, nothing else: an ``IndexError`` or ``RecursionError`` escaping a decoder
would be a crash a hostile peer could trigger. Inputs are random bytes, and valid encodings with
bytes flipped, cut or spliced (so the fuzzing gets past the first checks).

``tests/test_fuzz.py`` runs each target with a small budget in the suite; ``tests/bench/bench_fuzz.py``
runs them with a large one (100k examples each) and reports time and peak memory.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from meshllm.config import ConfigError, parse_config
from meshllm.models.gguf_shape import model_shape
from meshllm.serving.gguf_layout import GGUFError
from meshllm.wire.admission import AuthError, make_hello
from meshllm.wire.codec import CodecError, Message, decode, decode_as, encode
from meshllm.wire.framing import FrameBuffer, FrameError, parse_kind, read_frame
from meshllm.wire.gate import Gate
from meshllm.wire.grants import mint_grant
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import InviteError, InviteToken, MeshMembership
from meshllm.wire.messages import (
    Gossip,
    Hello,
    PeerAnnouncement,
    RouteReply,
    RouteTable,
    RpcTunnelRequest,
    TunnelRequest,
)

SAMPLES: tuple[Message, ...] = (
    TunnelRequest(model="m", method="POST", path="/v1/chat/completions", headers={"a": "b"}, body_bytes=12),
    RpcTunnelRequest(model="m"),
    Gossip(
        announcements=(
            PeerAnnouncement(
                node_id="ab" * 16, name="n", role="active", addrs=("10.0.0.1:9338",), vram_bytes=1 << 30,
                models=("m",), serving=("m",), demand={"m": 1.5}, model_bytes={"m": 123},
            ),
        )
    ),
)  # fmt: skip


def _mutated(sample: bytes) -> st.SearchStrategy[bytes]:
    """``sample`` with a byte flipped, cut short, or a random piece spliced in."""
    n = len(sample)
    flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
        lambda t: sample[: t[0]] + bytes([sample[t[0]] ^ t[1]]) + sample[t[0] + 1 :]
    )
    cut = st.integers(0, n - 1).map(lambda k: sample[:k])
    splice = st.tuples(st.integers(0, n), st.binary(max_size=16)).map(
        lambda t: sample[: t[0]] + t[1] + sample[t[0] :]
    )
    return st.one_of(flip, cut, splice)


def message_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), *(_mutated(encode(m)) for m in SAMPLES))


def frame_bytes() -> st.SearchStrategy[bytes]:
    framed = [len(encode(m)).to_bytes(4, "big") + encode(m) for m in SAMPLES]
    return st.one_of(st.binary(max_size=256), *(_mutated(f + f) for f in framed))


def config_text() -> st.SearchStrategy[str]:
    """TOML documents (random tables of the sections' keys and odd values) and plain garbage."""
    keys = st.sampled_from(
        ["name", "role", "join", "quic_listen", "vram_gb", "serve", "force_split", "listen", "threads",
         "format", "file", "probe_interval_s", "dead_after_s", "api_keys", "open", "tensor_cache", "x"]
    )  # fmt: skip
    values = st.one_of(
        st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.booleans(), st.text(max_size=20),
        st.lists(st.one_of(st.text(max_size=10), st.integers()), max_size=3),
    )  # fmt: skip
    tables = st.dictionaries(
        st.sampled_from(["node", "api", "console", "models", "llama", "log", "timing", "standby", "zzz"]),
        st.dictionaries(keys, values, max_size=4),
        max_size=4,
    )
    return st.one_of(st.text(max_size=200), tables.map(_to_toml))


def _to_toml(tables: dict[str, dict[str, object]]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    return "\n".join(
        f"[{t}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in kv.items()) for t, kv in tables.items()
    )


# -- the admission handshake: a real gate, tokens and Hellos of a real mesh to mutate --------------------

_NOW = 1_700_000_000.0
_SECRET = b"s" * 32
_MESH = MeshMembership.with_secret("m1", _SECRET)
_LISTENER = NodeIdentity.generate()
_DIALLER = NodeIdentity.generate()
_GATE = Gate(None, _MESH, _LISTENER, mint_grant(_SECRET, "m1", "active", _NOW, 0), clock=lambda: _NOW)
_TOKENS = tuple(
    _MESH.invite(_LISTENER.node_id, ("10.0.0.1:9338",), role, _NOW, 3600) for role in ("client", "active")
)
_HELLO = make_hello(
    _DIALLER, "m1", mint_grant(_SECRET, "m1", "client", _NOW, 3600), "client", _LISTENER.node_id
)


def token_text() -> st.SearchStrategy[str]:
    """Random text, and real tokens (a client's, an active one's) with characters changed or cut."""
    real = st.sampled_from([t.encode() for t in _TOKENS])
    changed = st.tuples(real, st.integers(0, 400), st.text(max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
    )
    return st.one_of(st.text(max_size=300), changed, real.map(lambda t: t[: len(t) // 2]))


def hello_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=400), _mutated(encode(_HELLO)))


# -- the targets: each returns normally or raises one of the decoder's own errors -----------------------------


def decode_message(data: bytes) -> None:
    try:
        decode(data)
    except CodecError:
        pass


def decode_route_reply(data: bytes) -> None:
    for cls in (RouteReply, RouteTable, TunnelRequest, RpcTunnelRequest):
        try:
            decode_as(data, cls)
        except CodecError:
            pass


def frames_in_pieces(data: bytes) -> None:
    buf = FrameBuffer(max_bytes=4096)
    try:
        for i in range(0, len(data), 7):
            buf.feed(data[i : i + 7])
    except CodecError:
        pass


def frame_from_a_stream(data: bytes) -> None:
    async def read() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        try:
            parse_kind(data[:1])
        except FrameError:
            pass
        try:
            await read_frame(reader, max_bytes=4096)
        except CodecError:
            pass

    asyncio.run(read())


def gguf_head(data: bytes) -> None:
    try:
        model_shape(b"GGUF" + data)
    except GGUFError:
        pass


def config(text: str) -> None:
    try:
        parse_config(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        pass
    except ConfigError:
        pass


def invite_token(text: str) -> None:
    try:
        InviteToken.decode(text)
    except InviteError:
        pass


def hello_admission(data: bytes) -> None:
    """A Hello as a dialler sends it: decoded, then put to the gate. Only a Hello signed by the key it
    names, with a grant of this mesh's authority, may pass; anything else is an AuthError."""
    try:
        hello = decode_as(data, Hello)
    except CodecError:
        return
    try:
        _GATE.admit(hello)
    except AuthError:
        return
    if hello != _HELLO:
        raise AssertionError(f"a changed Hello was admitted: {hello!r}")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None] | Callable[[str], None]
    inputs: Callable[[], st.SearchStrategy[bytes]] | Callable[[], st.SearchStrategy[str]]


TARGETS = (
    Target("codec.decode", decode_message, message_bytes),
    Target("codec.decode_as (route replies, tunnel headers)", decode_route_reply, message_bytes),
    Target("framing.FrameBuffer", frames_in_pieces, frame_bytes),
    Target("framing.read_frame", frame_from_a_stream, frame_bytes),
    Target("gguf_shape.model_shape", gguf_head, lambda: st.binary(max_size=512)),
    Target("config.parse_config", config, config_text),
    Target("invite.InviteToken.decode", invite_token, token_text),
    Target("admission (Hello through the gate)", hello_admission, hello_bytes),
)
