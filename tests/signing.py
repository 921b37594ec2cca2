"""Throwaway node keys for tests that feed announcements to code that checks their signatures.

Tests name nodes "a", "b", "me"; a real node id is the hash of a public key, so :func:`nid` gives each
short name its own generated identity (the same one for the whole test session) and :func:`signed`
signs an announcement with the key of whichever node it describes, the way that node itself would.
"""

from __future__ import annotations

from meshllm.wire.announcement import sign_announcement
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.messages import PeerAnnouncement

_BY_NAME: dict[str, NodeIdentity] = {}
_BY_ID: dict[str, NodeIdentity] = {}
_NAMES: dict[str, str] = {}


def identity(name: str) -> NodeIdentity:
    """The throwaway identity of the test node called ``name``."""
    ident = _BY_NAME.get(name)
    if ident is None:
        ident = _BY_NAME[name] = NodeIdentity.generate()
        _BY_ID[ident.node_id] = ident
        _NAMES[ident.node_id] = name
    return ident


def nid(name: str) -> str:
    """The real node id of the test node called ``name``."""
    return identity(name).node_id


def name_of(node_id: str) -> str:
    """The short name behind a node id from :func:`nid` (for readable assertions)."""
    return _NAMES.get(node_id, node_id)


def signed(ann: PeerAnnouncement) -> PeerAnnouncement:
    """``ann`` signed by the node it describes (its id must come from :func:`nid`)."""
    return sign_announcement(ann, _BY_ID[ann.node_id])
