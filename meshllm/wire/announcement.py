"""Signed peer announcements: the canonical bytes a node signs, signing, and checking (issue #12).

Gossip relays every node's announcement from node to node (hearsay), so a record's relayer is not
its author. Without a signature any member could publish another node's announcement with a huge
version, or fake models, and block that node's real updates until it restarted. A node therefore
signs its own announcement with its Ed25519 node key each time it changes, and every receiver checks
that the key hashes to the announced node id and that the signature holds before merging a record.

The payload is msgpack of ``[DOMAIN, field values in declaration order]`` without the signature,
each value normalised by its type hint so that it encodes the same on every node: dicts as maps with
sorted keys, floats always as floats (the codec turns a whole number in a float field into a float
on the way in), nested structs as arrays. Trailing fields equal to their defaults are left out, as
the codec lets a frame leave them out, so a field added later at the end keeps old signatures valid.
``DOMAIN`` keeps an announcement's signature from meaning anything in another signed context.

Pure: no clock, no I/O; the verdict cache is a bounded dict owned by whoever merges gossip.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from meshllm.wire.identity import node_id_of, verify_signature
from meshllm.wire.messages import PeerAnnouncement

DOMAIN = "meshllm/peer-announcement/1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
CACHE_ENTRIES = 4096
"""Verdicts kept by an :class:`AnnouncementVerifier`: far more than the records one round carries."""


class Signer(Protocol):
    """What signs a node's own announcement: :class:`meshllm.wire.identity.NodeIdentity` is one."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


_Plain = Callable[[Any], Any]
_PLAINERS: dict[type, list[tuple[str, _Plain, Any]]] = {}


def _plainer(hint: Any) -> _Plain:
    """A function turning a value of type ``hint`` into its canonical msgpack-ready form."""
    if hint is float:
        return float
    if hint in (int, str, bytes, bool):
        return lambda v: v
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        item = _plainer(args[0])
        return lambda v: [item(x) for x in v]
    if origin is dict:
        key, val = _plainer(args[0]), _plainer(args[1])
        return lambda v: {key(k): val(x) for k, x in sorted(v.items())}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return lambda v: _struct(hint, v)
    raise TypeError(f"no canonical form for {hint!r}")


def _fields(cls: type) -> list[tuple[str, _Plain, Any]]:
    """(name, canonicaliser, default or MISSING) per field, computed once per class."""
    cached = _PLAINERS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            cached.append((f.name, _plainer(hints[f.name]), default))
        _PLAINERS[cls] = cached
    return cached


def _struct(cls: type, value: Any, skip: str = "") -> list[Any]:
    fields = [(n, p, d) for n, p, d in _fields(cls) if n != skip]
    end = len(fields)
    while end and fields[end - 1][2] == getattr(value, fields[end - 1][0]):
        end -= 1  # a trailing default is the same as a field left out
    return [plain(getattr(value, name)) for name, plain, _ in fields[:end]]


def announcement_payload(ann: PeerAnnouncement) -> bytes:
    """The bytes ``ann.public_key``'s owner signs: every field but the signature, canonically."""
    body: bytes = msgpack.packb(
        [DOMAIN, *_struct(PeerAnnouncement, ann, skip="signature")], use_bin_type=True
    )
    return body


def sign_announcement(ann: PeerAnnouncement, signer: Signer) -> PeerAnnouncement:
    """``ann`` carrying ``signer``'s public key and its signature; refuses another node's record."""
    public_key = signer.public_key
    if node_id_of(public_key) != ann.node_id:
        raise ValueError(
            f"a key of node {node_id_of(public_key)} cannot sign node {ann.node_id}'s announcement"
        )
    keyed = dataclasses.replace(ann, public_key=public_key, signature=b"")
    return dataclasses.replace(keyed, signature=signer.sign(announcement_payload(keyed)))


def _refusal(ann: PeerAnnouncement, payload: bytes) -> str | None:
    if len(ann.public_key) != PUBLIC_KEY_BYTES:
        return f"public key of {len(ann.public_key)} bytes, not {PUBLIC_KEY_BYTES}"
    if node_id_of(ann.public_key) != ann.node_id:
        return "node id does not match the public key"
    if len(ann.signature) != SIGNATURE_BYTES:
        return f"signature of {len(ann.signature)} bytes, not {SIGNATURE_BYTES}"
    if not verify_signature(ann.public_key, ann.signature, payload):
        return "bad signature"
    return None


def refusal(ann: PeerAnnouncement) -> str | None:
    """Why ``ann`` must not be believed, or None when its own node signed it as it stands."""
    try:
        payload = announcement_payload(ann)
    except (TypeError, ValueError, AttributeError) as exc:  # a value no decoded frame can hold
        return f"unreadable: {exc.__class__.__name__}"
    return _refusal(ann, payload)


class AnnouncementVerifier:
    """:func:`refusal` with a bounded cache of verdicts, so an unchanged record is checked once.

    Gossip carries every peer's announcement every round (and a forged record comes back every
    round too), while an Ed25519 verification costs far more than encoding the payload. The cache
    is keyed by the payload and the signature together - not only by (node id, incarnation,
    version, signature): a relayer could keep a valid record's signature and version and change its
    other fields, and such a copy must not inherit the original's verdict.
    """

    def __init__(self, max_entries: int = CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._verdicts: OrderedDict[tuple[bytes, bytes], str | None] = OrderedDict()
        self.verified = 0  # signature checks actually run (the rest were answered from the cache)

    def refusal(self, ann: PeerAnnouncement) -> str | None:
        try:
            payload = announcement_payload(ann)
        except (TypeError, ValueError, AttributeError) as exc:
            return f"unreadable: {exc.__class__.__name__}"
        key = (payload, ann.signature)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        verdict = _refusal(ann, payload)
        self.verified += 1
        self._verdicts[key] = verdict
        if len(self._verdicts) > self.max_entries:
            self._verdicts.popitem(last=False)
        return verdict
