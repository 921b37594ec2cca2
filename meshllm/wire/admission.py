"""Admission: the Hello frame that proves a peer's node key and what its grant lets it do.

The initiator of a connection sends a Hello addressed to the node it dialled, carrying its grant
(:mod:`meshllm.wire.grants`) and signed with its node key over every field, grant included, so it
cannot be moved to another target, node or grant. The listener checks the signature, the grant
against the mesh's authority key, expiry and revocation, and gives the connection the role the grant
allows - never just the role the Hello asks for. The answer Hello carries no grant (a grant handed
to whoever dialled could be replayed): it echoes the dialler's nonce, signed with the listener's key;
the QUIC certificate separately binds that key to the connection.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from meshllm.wire.codec import encode
from meshllm.wire.grants import GrantError, capability, check_grant
from meshllm.wire.identity import NodeIdentity, node_id_of, verify_signature
from meshllm.wire.messages import Grant, Hello

MIN_NONCE = 16


class AuthError(Exception):
    """Why a Hello was refused; the text is sent back in a Refused frame and logged on both sides."""


@dataclass(frozen=True)
class Admitted:
    """What a Hello was admitted as: the node, the role its connection gets, and the grant's token."""

    node_id: str
    role: str
    grant_role: str
    token_id: str


def hello_payload(
    mesh_id: str, node_id: str, public_key: bytes, role: str, target: str, nonce: bytes, grant: Grant | None
) -> bytes:
    grant_bytes = encode(grant) if grant is not None else b""
    packed: bytes = msgpack.packb(
        ["meshllm-hello/2", mesh_id, node_id, public_key, role, target, nonce, grant_bytes]
    )
    return packed


def make_hello(
    identity: NodeIdentity,
    mesh_id: str,
    grant: Grant | None,
    role: str,
    target: str,
    nonce: bytes | None = None,
) -> Hello:
    nonce = nonce if nonce is not None else secrets.token_bytes(MIN_NONCE)
    payload = hello_payload(mesh_id, identity.node_id, identity.public_key, role, target, nonce, grant)
    return Hello(
        mesh_id=mesh_id,
        node_id=identity.node_id,
        public_key=identity.public_key,
        role=role,
        target=target,
        nonce=nonce,
        grant=grant,
        signature=identity.sign(payload),
    )


def answer_hello(identity: NodeIdentity, mesh_id: str, role: str, hello: Hello) -> Hello:
    """The listener's answer to an admitted Hello: its own key, the dialler's nonce, no grant."""
    return make_hello(identity, mesh_id, None, role, hello.node_id, nonce=hello.nonce)


def check_signed(hello: Hello, mesh_id: str, own_id: str) -> None:
    """Raise AuthError unless the Hello is for this node, from this mesh, and signed by its sender."""
    if hello.mesh_id != mesh_id:
        raise AuthError(f"wrong mesh: {hello.mesh_id!r} is not this node's mesh")
    if hello.target != own_id:
        raise AuthError("hello addressed to another node")
    if len(hello.nonce) < MIN_NONCE:
        raise AuthError("hello nonce too short")
    if node_id_of(hello.public_key) != hello.node_id:
        raise AuthError("node id does not match its public key")
    payload = hello_payload(
        hello.mesh_id, hello.node_id, hello.public_key, hello.role, hello.target, hello.nonce, hello.grant
    )
    if not verify_signature(hello.public_key, hello.signature, payload):
        raise AuthError("bad signature")


def admit(
    hello: Hello,
    mesh_id: str,
    authority: bytes,
    own_id: str,
    now: float,
    remembered: Callable[[str], bool],
    revoked: Callable[[str, str], str],
) -> Admitted:
    """Check a dialler's Hello and say what its connection may do; AuthError says why not.

    ``remembered(node_id)``: this node admitted that key before (an expired grant still admits it);
    ``revoked(node_id, token_id)``: why that node or token is revoked, "" when it is not."""
    check_signed(hello, mesh_id, own_id)
    grant = hello.grant
    if grant is None:
        raise AuthError("hello carries no grant: join with an invite token (meshllm invite)")
    reason = revoked(hello.node_id, grant.token_id)
    if reason:
        raise AuthError(reason)
    try:
        check_grant(grant, authority, mesh_id, hello.node_id, now, remembered(hello.node_id))
        role = capability(grant.role, hello.role)
    except GrantError as exc:
        raise AuthError(str(exc)) from None
    return Admitted(node_id=hello.node_id, role=role, grant_role=grant.role, token_id=grant.token_id)


def verify_answer(answer: Hello, mesh_id: str, own_id: str, expected_node: str, sent: Hello) -> None:
    """Raise AuthError unless the answer comes from the node we dialled and answers our Hello."""
    check_signed(answer, mesh_id, own_id)
    if answer.node_id != expected_node:
        raise AuthError(f"expected node {expected_node}, hello is from {answer.node_id}")
    if answer.nonce != sent.nonce:
        raise AuthError("answer does not echo our nonce")
