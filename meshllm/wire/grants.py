"""Capabilities: the mesh's authority key, the grants it signs, the role rules, and revocations.

Why: a token used to carry the mesh secret, so whoever held one could do everything a member can.
Now the secret only derives the mesh's *authority key* (Ed25519, deterministic, so every holder of
the secret holds the same key and nobody stores it); token holders get its public half and a
*grant* signed with it. A grant names the most a connection presenting it may do, may expire, may
be bound to one node key, and is refused once its token id (or the node) is revoked. These are pure
functions: no clock, no files; callers pass ``now``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets

import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshllm.wire.identity import verify_signature
from meshllm.wire.messages import Grant, Revocation

ROLES = ("client", "standby", "active")
NEVER = 0
"""``expires_at`` of a grant that does not expire."""
DEFAULT_TTL_S = 24 * 3600
ALLOWED: dict[str, frozenset[str]] = {
    "client": frozenset({"client"}),
    # A standby promotes itself (in-process, when the mesh needs it) and re-dials as active with the
    # same grant: a standby grant is trusted to make that call.
    "standby": frozenset({"client", "standby", "active"}),
    "active": frozenset(ROLES),
}
"""Which roles a connection may take under a grant of each role."""
_AUTHORITY_INFO = b"meshllm-authority/1"
_TTL = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class GrantError(ValueError):
    """A grant or revocation that does not hold, with the reason (logged, sent in Refused)."""


def authority_key(secret: bytes) -> Ed25519PrivateKey:
    """The mesh's authority key: HKDF-SHA256 of the mesh secret, so every secret holder has it."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AUTHORITY_INFO).derive(secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


def authority_public(secret: bytes) -> bytes:
    """The raw public half of :func:`authority_key`: what every token carries."""
    return (
        authority_key(secret)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def fingerprint(authority: bytes) -> str:
    """A short, loggable name for a mesh's authority key (no secret in it)."""
    return hashlib.sha256(authority).hexdigest()[:16]


def new_token_id() -> str:
    return secrets.token_hex(16)


def grant_payload(grant: Grant) -> bytes:
    packed: bytes = msgpack.packb(
        ["meshllm-grant/1", grant.mesh_id, grant.role, grant.token_id, grant.expires_at, grant.node_id]
    )
    return packed


def mint_grant(
    secret: bytes,
    mesh_id: str,
    role: str,
    now: float,
    ttl_s: int = DEFAULT_TTL_S,
    node_id: str = "",
    token_id: str | None = None,
) -> Grant:
    """A grant signed by the mesh's authority; ``ttl_s`` 0 never expires."""
    if role not in ROLES:
        raise GrantError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if not secret:
        raise GrantError(
            "this node does not hold the mesh secret: only nodes joined with an active token can"
        )
    unsigned = Grant(
        mesh_id=mesh_id,
        role=role,
        token_id=token_id or new_token_id(),
        expires_at=NEVER if ttl_s == 0 else int(now) + ttl_s,
        node_id=node_id,
        signature=b"",
    )
    return dataclasses.replace(unsigned, signature=authority_key(secret).sign(grant_payload(unsigned)))


def check_grant(
    grant: Grant, authority: bytes, mesh_id: str, node_id: str, now: float, remembered: bool
) -> None:
    """Raise GrantError unless the grant is this mesh's, signed by its authority, for this node, and
    not expired (an expired grant still admits a node this node ``remembered``)."""
    if grant.mesh_id != mesh_id:
        raise GrantError(f"grant is for mesh {grant.mesh_id!r}, not this node's mesh")
    if not verify_signature(authority, grant.signature, grant_payload(grant)):
        raise GrantError("grant not signed by this mesh's authority")
    if grant.role not in ROLES:
        raise GrantError(f"grant names an unknown role {grant.role!r}")
    if grant.node_id and grant.node_id != node_id:
        raise GrantError("grant is bound to another node")
    if grant.expires_at != NEVER and grant.expires_at <= now and not remembered:
        raise GrantError("invite expired: ask for a new token (meshllm invite)")


def capability(grant_role: str, requested: str) -> str:
    """The role a connection gets: the one it asks for, if its grant allows it; else GrantError."""
    if requested not in ROLES:
        raise GrantError(f"unknown role {requested!r}")
    if requested not in ALLOWED.get(grant_role, frozenset()):
        raise GrantError(f"a {grant_role} grant does not allow role {requested}")
    return requested


def stronger(a: Grant, b: Grant) -> bool:
    """Whether ``a`` grants more than ``b`` (role first, then the later expiry)."""

    def rank(g: Grant) -> tuple[int, float]:
        return ROLES.index(g.role) if g.role in ROLES else -1, float(
            "inf"
        ) if g.expires_at == NEVER else g.expires_at

    return rank(a) > rank(b)


def parse_ttl(text: str) -> int:
    """Seconds from ``30m``, ``24h``, ``7d``, ``2w``, ``90`` (seconds); ``0`` or ``never``: 0."""
    if text.strip().lower() == "never":
        return NEVER
    match = _TTL.match(text.lower())
    if match is None:
        raise GrantError(f"bad ttl {text!r}: a number with s, m, h, d or w (30m, 24h, 7d), or never")
    return int(match.group(1)) * _UNITS[match.group(2)]


def revocation_payload(rev: Revocation) -> bytes:
    packed: bytes = msgpack.packb(["meshllm-revoke/1", rev.mesh_id, rev.target, rev.issued_at])
    return packed


def sign_revocation(secret: bytes, mesh_id: str, target: str, now: float) -> Revocation:
    if not secret:
        raise GrantError(
            "this node does not hold the mesh secret: only nodes joined with an active token can revoke"
        )
    unsigned = Revocation(mesh_id=mesh_id, target=target, issued_at=int(now), signature=b"")
    return Revocation(mesh_id, target, int(now), authority_key(secret).sign(revocation_payload(unsigned)))


def check_revocation(rev: Revocation, authority: bytes, mesh_id: str) -> None:
    if rev.mesh_id != mesh_id:
        raise GrantError(f"revocation is for mesh {rev.mesh_id!r}")
    if not rev.target:
        raise GrantError("revocation names nothing")
    if not verify_signature(authority, rev.signature, revocation_payload(rev)):
        raise GrantError("revocation not signed by this mesh's authority")
