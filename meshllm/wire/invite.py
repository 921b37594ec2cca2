"""Invite tokens, mesh membership, and the grant a node presents.

A token is base64url of a small msgpack record: the inviting node's id and addresses, the mesh id,
the public half of the mesh's authority key, a grant signed with that key (a role, a token id, an
expiry), and the mesh secret only when the grant's role is ``active`` (an active member can invite
and revoke in turn). Peers never send the secret on the wire: they present their grant in a Hello
signed with their node key (:mod:`meshllm.wire.admission`).

Files in the data dir: ``mesh.json`` (mesh id, authority public key, the secret if held; 0600) and
``grant.json`` (the grant this node presents; 0600).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgpack

from meshllm.wire.codec import CodecError, Message, decode_as, encode, message
from meshllm.wire.grants import (
    DEFAULT_TTL_S,
    NEVER,
    ROLES,
    GrantError,
    authority_public,
    grant_payload,
    mint_grant,
    new_token_id,
    stronger,
)
from meshllm.wire.identity import verify_signature
from meshllm.wire.messages import Grant

MESH_FILE = "mesh.json"
GRANT_FILE = "grant.json"
OLD_TOKEN_TAG = 60
"""Tokens of meshllm before capabilities (they carried the secret for everyone): refused by name."""


class InviteError(ValueError):
    """A token that cannot be used, with the reason."""


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


@message(63)
@dataclass(frozen=True)
class InviteToken(Message):
    """What a token carries (version 2: capability-scoped)."""

    node_id: str
    addrs: tuple[str, ...]
    mesh_id: str
    authority: bytes
    grant: Grant
    secret: bytes

    def encode(self) -> str:
        return base64.urlsafe_b64encode(encode(self)).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> InviteToken:
        text = text.strip()
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise InviteError("invite token is not base64url") from None
        if _tag_of(raw) == OLD_TOKEN_TAG:
            raise InviteError(
                "invite token is from an older meshllm (v1): ask for a new one (meshllm invite)"
            )
        try:
            token = decode_as(raw, cls, max_bytes=4096)
        except CodecError as exc:
            raise InviteError(f"invite token is malformed: {exc}") from None
        token.check()
        return token

    def check(self) -> None:
        """Raise InviteError unless the token is internally consistent (whether its grant admits
        anyone is for the mesh's nodes to decide, against their own authority key)."""
        if not self.addrs:
            raise InviteError("invite token has no addresses")
        if len(self.authority) != 32:
            raise InviteError("invite token's authority key is malformed")
        if self.grant.mesh_id != self.mesh_id or self.grant.role not in ROLES:
            raise InviteError("invite token's grant is malformed")
        if not verify_signature(self.authority, self.grant.signature, grant_payload(self.grant)):
            raise InviteError("invite token's grant is not signed by its mesh's authority (damaged?)")
        if self.grant.role == "active":
            if len(self.secret) < 16:
                raise InviteError("invite token's mesh secret is too short")
            if authority_public(self.secret) != self.authority:
                raise InviteError("invite token's mesh secret does not match its authority key")
        elif self.secret:
            raise InviteError(f"invite token is malformed: a {self.grant.role} token carries no secret")


def _tag_of(raw: bytes) -> object:
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception:  # any garbage: the codec says why
        return None
    return value[0] if isinstance(value, list) and value else None


@dataclass(frozen=True)
class MeshMembership:
    """Which mesh this node belongs to, its authority's public key, and the secret if this node holds it."""

    mesh_id: str
    authority: bytes
    secret: bytes = b""

    @classmethod
    def with_secret(cls, mesh_id: str, secret: bytes) -> MeshMembership:
        return cls(mesh_id=mesh_id, authority=authority_public(secret), secret=secret)

    @classmethod
    def found(cls) -> MeshMembership:
        return cls.with_secret(secrets.token_hex(8), secrets.token_bytes(32))

    @classmethod
    def resolve(cls, data_dir: Path, tokens: list[InviteToken]) -> MeshMembership:
        """The mesh of the join tokens if any (they must agree), else the stored one, else a new mesh.

        A secret already stored for the same mesh is kept (a member re-joining with a client token
        still knows it). The result is stored in ``data_dir/mesh.json``.
        """
        stored = cls.load(data_dir)
        if tokens:
            ids = {t.mesh_id for t in tokens}
            if len(ids) > 1:
                raise InviteError(f"join tokens name different meshes: {sorted(ids)}")
            first = tokens[0]
            if any(t.authority != first.authority for t in tokens):
                raise InviteError("join tokens for one mesh carry different authority keys")
            held = {t.secret for t in tokens if t.secret}
            if len(held) > 1:
                raise InviteError("join tokens for one mesh carry different secrets")
            secret = held.pop() if held else b""
            if (
                not secret
                and stored is not None
                and (stored.mesh_id, stored.authority)
                == (
                    first.mesh_id,
                    first.authority,
                )
            ):
                secret = stored.secret
            membership = cls(first.mesh_id, first.authority, secret)
        else:
            membership = stored if stored is not None else cls.found()
        membership.store(data_dir)
        return membership

    @classmethod
    def load(cls, data_dir: Path) -> MeshMembership | None:
        path = data_dir / MESH_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            mesh_id, secret = data["mesh_id"], bytes.fromhex(data.get("secret", ""))
            if not isinstance(mesh_id, str) or not (secret or "authority" in data):
                raise ValueError("no mesh id, or neither authority key nor secret")
            authority = bytes.fromhex(data["authority"]) if "authority" in data else authority_public(secret)
            return cls(mesh_id=mesh_id, authority=authority, secret=secret)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InviteError(f"{path}: unreadable mesh state ({exc})") from None

    def store(self, data_dir: Path) -> None:
        body = {"mesh_id": self.mesh_id, "authority": self.authority.hex(), "secret": self.secret.hex()}
        write_private(data_dir / MESH_FILE, json.dumps(body))

    def invite(
        self, node_id: str, addrs: tuple[str, ...], role: str, now: float, ttl_s: int = DEFAULT_TTL_S
    ) -> InviteToken:
        """A token for ``role`` that expires ``ttl_s`` from ``now`` (0: never); needs the secret."""
        try:
            grant = mint_grant(self.secret, self.mesh_id, role, now, ttl_s)
        except GrantError as exc:
            raise InviteError(str(exc)) from None
        return InviteToken(
            node_id=node_id,
            addrs=addrs,
            mesh_id=self.mesh_id,
            authority=self.authority,
            grant=grant,
            secret=self.secret if role == "active" else b"",
        )


def load_grant(data_dir: Path) -> Grant | None:
    path = data_dir / GRANT_FILE
    if not path.exists():
        return None
    try:
        return decode_as(bytes.fromhex(json.loads(path.read_text())["grant"]), Grant)
    except (ValueError, KeyError, TypeError, CodecError) as exc:
        raise InviteError(f"{path}: unreadable grant ({exc})") from None


def own_grant(
    data_dir: Path, membership: MeshMembership, node_id: str, tokens: list[InviteToken], now: float
) -> Grant | None:
    """The grant this node presents in its Hellos, stored in ``grant.json``.

    A node holding the secret signs itself an active grant bound to its own key that never expires
    (it could mint any grant anyway); it keeps the token id it joined with, so revoking that token
    also revokes it. Any other node presents the strongest grant of its join tokens (or the stored
    one): when that expires, only nodes that admitted it before still admit it.
    """
    joined = [t.grant for t in tokens if t.mesh_id == membership.mesh_id]
    best: Grant | None = None
    for g in joined:
        if best is None or stronger(g, best):
            best = g
    if best is None:
        stored = load_grant(data_dir)
        best = stored if stored is not None and stored.mesh_id == membership.mesh_id else None
    if membership.secret:
        token_id = best.token_id if best is not None else new_token_id()
        best = mint_grant(membership.secret, membership.mesh_id, "active", now, NEVER, node_id, token_id)
    if best is not None:
        write_private(data_dir / GRANT_FILE, json.dumps({"grant": encode(best).hex()}))
    return best


ADDRS_FILE = "addrs.json"


def write_addrs(data_dir: Path, node_id: str, addrs: tuple[str, ...]) -> None:
    """Where the running node listens (no secret in it), so ``meshllm invite`` works with port 0."""
    tmp = data_dir / (ADDRS_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"node_id": node_id, "addrs": list(addrs)}, f)
    tmp.replace(data_dir / ADDRS_FILE)


def read_addrs(data_dir: Path) -> tuple[str, ...]:
    """The addresses the node last started with wrote; () when it never started."""
    try:
        data = json.loads((data_dir / ADDRS_FILE).read_text())
        return tuple(str(a) for a in data["addrs"])
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def role_problem(role: str, grant: Grant | None, promoted: bool) -> str:
    """Why a node configured as ``role`` cannot run with ``grant`` ("" when it can)."""
    if grant is None:
        return "" if role != "active" else "no invite grant: join with an active token, or found a mesh"
    if grant.role == "client" and role != "client":
        return f"node.join: the invite token grants client only; role {role} needs a {role} or active token"
    if grant.role == "standby" and role == "active" and not promoted:
        return "node.join: a standby token starts a standby (it turns active only by promotion); role active needs an active token"
    return ""
