"""Tests for meshllm.wire.announcement: the signed payload, signing, checking and the verdict cache."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.wire.announcement import (
    DOMAIN,
    AnnouncementVerifier,
    announcement_payload,
    refusal,
    sign_announcement,
)
from meshllm.wire.codec import decode, encode
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.messages import Gossip, GpuReport, PeerAnnouncement

NODE = NodeIdentity.generate()
OTHER = NodeIdentity.generate()


def ann(identity: NodeIdentity = NODE, **fields: Any) -> PeerAnnouncement:
    base = PeerAnnouncement(
        node_id=identity.node_id,
        name="node",
        role="active",
        addrs=("10.0.0.1:7000",),
        vram_bytes=1 << 30,
        models=("m", "n"),
        serving=("m",),
        incarnation=5,
        version=2,
        demand={"m": 1.5, "n": 2.0},
        model_bytes={"m": 10, "n": 20},
        gpus=(GpuReport("L4", 24 << 30, 20 << 30),),
    )
    return replace(base, **fields)


def test_a_signed_announcement_is_believed_and_survives_the_wire() -> None:
    signed = sign_announcement(ann(), NODE)
    assert signed.public_key == NODE.public_key and len(signed.signature) == 64
    assert refusal(signed) is None
    [back] = decode(encode(Gossip(announcements=(signed,)))).announcements  # type: ignore[attr-defined]
    assert back == signed and refusal(back) is None


def test_the_payload_is_every_field_but_the_signature_in_order() -> None:
    signed = sign_announcement(ann(), NODE)
    values = msgpack.unpackb(announcement_payload(signed))
    assert values[0] == DOMAIN
    assert values[1:4] == [signed.node_id, "node", "active"]
    assert values[-1] == NODE.public_key  # the key is signed too; the signature is not
    # model_context, the last field, is left out at its default (as the codec leaves it out)
    assert len(values) == 1 + len(dataclasses.fields(PeerAnnouncement)) - 2
    with_context = sign_announcement(ann(model_context={"m": 4096}), NODE)
    assert msgpack.unpackb(announcement_payload(with_context))[-2:] == [NODE.public_key, {"m": 4096}]


def test_dicts_sign_the_same_whatever_their_order_and_whole_floats_as_floats() -> None:
    """A receiver's decoder builds dicts in wire order and turns 2 into 2.0 in a float field."""
    one = ann(demand={"m": 1.5, "n": 2.0}, model_bytes={"m": 10, "n": 20})
    other = ann(demand={"n": 2, "m": 1.5}, model_bytes={"n": 20, "m": 10})
    assert announcement_payload(one) == announcement_payload(other)
    signed = sign_announcement(other, NODE)
    assert refusal(replace(signed, demand={"m": 1.5, "n": 2.0})) is None


def test_trailing_defaults_sign_like_fields_left_out() -> None:
    """A frame may leave out trailing fields at their defaults; it must not change what was signed."""
    bare = PeerAnnouncement(NODE.node_id, "n", "active", ("a:1",), 1)
    assert msgpack.unpackb(announcement_payload(bare)) == [DOMAIN, NODE.node_id, "n", "active", ["a:1"], 1]


def test_a_signature_by_another_key_is_refused() -> None:
    by_other = sign_announcement(ann(), NODE)
    forged = replace(by_other, signature=OTHER.sign(announcement_payload(by_other)))
    assert refusal(forged) == "bad signature"
    # Nor may the forger put its own key in: the key must hash to the node id.
    with_key = replace(ann(), public_key=OTHER.public_key)
    assert refusal(replace(with_key, signature=OTHER.sign(announcement_payload(with_key)))) == (
        "node id does not match the public key"
    )
    with pytest.raises(ValueError, match="cannot sign"):
        sign_announcement(ann(), OTHER)


def test_unsigned_and_malformed_records_are_refused_with_a_reason() -> None:
    signed = sign_announcement(ann(), NODE)
    assert refusal(ann()) == "public key of 0 bytes, not 32"
    assert refusal(replace(signed, public_key=signed.public_key[:31])) == "public key of 31 bytes, not 32"
    assert refusal(replace(signed, signature=b"")) == "signature of 0 bytes, not 64"
    assert refusal(replace(signed, signature=bytes(64))) == "bad signature"
    assert refusal(replace(signed, demand={"m": "x"})) is not None  # type: ignore[dict-item]
    assert refusal(replace(signed, models=None)) == "unreadable: TypeError"  # type: ignore[arg-type]


# -- tampering with any field ------------------------------------------------------------------------------

SIGNED = sign_announcement(ann(), NODE)
TAMPERED: dict[str, st.SearchStrategy[Any]] = {
    "node_id": st.just(OTHER.node_id),
    "name": st.text(max_size=8),
    "role": st.sampled_from(["client", "standby", "active "]),
    "addrs": st.lists(st.text(max_size=12), max_size=3).map(tuple),
    "vram_bytes": st.integers(0, 1 << 50),
    "models": st.lists(st.text(max_size=6), max_size=3).map(tuple),
    "serving": st.lists(st.text(max_size=6), max_size=3).map(tuple),
    "incarnation": st.integers(0, 1 << 63),
    "version": st.integers(0, 1 << 63),
    "rpc_ready": st.lists(st.text(max_size=6), max_size=3).map(tuple),
    "force_split": st.booleans(),
    "promoted_for": st.lists(st.text(max_size=6), max_size=3).map(tuple),
    "demand": st.dictionaries(st.text(max_size=6), st.floats(allow_nan=False), max_size=3),
    "stuck": st.lists(st.text(max_size=6), max_size=3).map(tuple),
    "model_bytes": st.dictionaries(st.text(max_size=6), st.integers(0, 1 << 40), max_size=3),
    "gpus": st.lists(st.builds(GpuReport, st.text(max_size=6), st.integers(0, 99), st.integers(0, 99))).map(
        tuple
    ),
    "public_key": st.binary(min_size=32, max_size=32),
    "signature": st.binary(min_size=64, max_size=64),
    "model_context": st.dictionaries(st.text(max_size=6), st.integers(0, 1 << 20), max_size=3),
}


def test_every_field_has_a_tampering_strategy() -> None:
    assert set(TAMPERED) == {f.name for f in dataclasses.fields(PeerAnnouncement)}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(TAMPERED)).flatmap(lambda name: st.tuples(st.just(name), TAMPERED[name])))
def test_tampering_with_any_field_invalidates_the_signature(change: tuple[str, Any]) -> None:
    name, value = change
    tampered = replace(SIGNED, **{name: value})
    if tampered == SIGNED:
        return  # drew the value it already had
    assert refusal(tampered) is not None
    assert AnnouncementVerifier().refusal(tampered) is not None


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(0, 1 << 63), st.integers(0, 1 << 63), st.lists(st.text(max_size=6), max_size=3))
def test_any_record_its_node_signs_is_believed(incarnation: int, version: int, serving: list[str]) -> None:
    signed = sign_announcement(ann(incarnation=incarnation, version=version, serving=tuple(serving)), NODE)
    assert refusal(signed) is None
    [back] = decode(encode(Gossip(announcements=(signed,)))).announcements  # type: ignore[attr-defined]
    assert refusal(back) is None


# -- the verdict cache ----------------------------------------------------------------------------------------


def test_an_unchanged_record_is_verified_once() -> None:
    verifier = AnnouncementVerifier()
    signed = sign_announcement(ann(), NODE)
    forged = replace(signed, version=10**9, serving=("fake",))
    for _ in range(5):
        assert verifier.refusal(signed) is None
        assert verifier.refusal(forged) == "bad signature"
    assert verifier.verified == 2


def test_a_copy_keeping_a_verified_records_version_and_signature_gets_no_free_pass() -> None:
    """The cache must not be keyed by (node id, incarnation, version, signature) alone."""
    verifier = AnnouncementVerifier()
    signed = sign_announcement(ann(), NODE)
    assert verifier.refusal(signed) is None
    assert verifier.refusal(replace(signed, serving=("fake",))) == "bad signature"


def test_the_cache_is_bounded() -> None:
    verifier = AnnouncementVerifier(max_entries=3)
    records = [sign_announcement(ann(version=v), NODE) for v in range(5)]
    for r in records:
        verifier.refusal(r)
    assert verifier.verified == 5
    verifier.refusal(records[-1])  # still cached
    verifier.refusal(records[0])  # evicted: checked again
    assert verifier.verified == 6
