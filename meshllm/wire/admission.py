"""Admission: the Hello frame that proves a peer holds the mesh secret and its node key.

The initiator of a connection sends a Hello addressed to the node it dialled; the answer is a Hello
addressed back. Each carries an HMAC with the mesh secret (membership) and an Ed25519 signature
with the node key (identity), both over the same payload, so neither can be moved to another
target or node. The QUIC certificate separately binds the listening side's key to the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgpack

from meshllm.wire.identity import NodeIdentity, node_id_of, verify_signature
from meshllm.wire.invite import MeshMembership
from meshllm.wire.messages import Hello


class AuthError(Exception):
    """Why a Hello was refused; the text is sent back in a Refused frame and logged on both sides."""


def hello_payload(
    mesh_id: str, node_id: str, public_key: bytes, role: str, target: str, nonce: bytes
) -> bytes:
    packed: bytes = msgpack.packb(["meshllm-hello/1", mesh_id, node_id, public_key, role, target, nonce])
    return packed


def make_hello(identity: NodeIdentity, membership: MeshMembership, role: str, target: str) -> Hello:
    nonce = secrets.token_bytes(16)
    payload = hello_payload(membership.mesh_id, identity.node_id, identity.public_key, role, target, nonce)
    mac = hmac.new(membership.secret, payload, hashlib.sha256).digest()
    return Hello(
        mesh_id=membership.mesh_id,
        node_id=identity.node_id,
        public_key=identity.public_key,
        role=role,
        target=target,
        nonce=nonce,
        mac=mac,
        signature=identity.sign(payload + mac),
    )


def verify_hello(
    hello: Hello, membership: MeshMembership, own_id: str, expected_node: str | None = None
) -> None:
    """Raise AuthError unless the Hello is for this node, from this mesh, and signed by its sender."""
    if hello.mesh_id != membership.mesh_id:
        raise AuthError(f"wrong mesh: {hello.mesh_id!r} is not this node's mesh")
    if hello.target != own_id:
        raise AuthError("hello addressed to another node")
    if len(hello.nonce) < 16:
        raise AuthError("hello nonce too short")
    payload = hello_payload(
        hello.mesh_id, hello.node_id, hello.public_key, hello.role, hello.target, hello.nonce
    )
    expected_mac = hmac.new(membership.secret, payload, hashlib.sha256).digest()
    if not hmac.compare_digest(expected_mac, hello.mac):
        raise AuthError("bad mesh secret")
    if node_id_of(hello.public_key) != hello.node_id:
        raise AuthError("node id does not match its public key")
    if expected_node is not None and hello.node_id != expected_node:
        raise AuthError(f"expected node {expected_node}, hello is from {hello.node_id}")
    if not verify_signature(hello.public_key, hello.signature, payload + hello.mac):
        raise AuthError("bad signature")
