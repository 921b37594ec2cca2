"""Invite tokens and mesh membership.

A token is base64url of a small msgpack record: the inviting node's id and addresses, the mesh id and
the mesh secret. Whoever holds a token can join; the secret never travels in the clear on the wire
(peers prove it with an HMAC in :mod:`meshllm.wire.admission`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from meshllm.wire.codec import CodecError, Message, decode_as, encode, message

MESH_FILE = "mesh.json"


class InviteError(ValueError):
    """A token that cannot be used, with the reason."""


@message(60)
@dataclass(frozen=True)
class InviteToken(Message):
    """What a token carries."""

    node_id: str
    addrs: tuple[str, ...]
    mesh_id: str
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
        try:
            token = decode_as(raw, cls, max_bytes=4096)
        except CodecError as exc:
            raise InviteError(f"invite token is malformed: {exc}") from None
        if not token.addrs:
            raise InviteError("invite token has no addresses")
        if len(token.secret) < 16:
            raise InviteError("invite token's mesh secret is too short")
        return token


@dataclass(frozen=True)
class MeshMembership:
    """Which mesh this node belongs to and the secret that proves it."""

    mesh_id: str
    secret: bytes

    @classmethod
    def found(cls) -> MeshMembership:
        return cls(mesh_id=secrets.token_hex(8), secret=secrets.token_bytes(32))

    @classmethod
    def resolve(cls, data_dir: Path, tokens: list[InviteToken]) -> MeshMembership:
        """The mesh of the join tokens if any (they must agree), else the stored one, else a new mesh.

        The result is stored in ``data_dir/mesh.json`` so ``meshllm invite`` and restarts agree.
        """
        if tokens:
            ids = {t.mesh_id for t in tokens}
            if len(ids) > 1:
                raise InviteError(f"join tokens name different meshes: {sorted(ids)}")
            first = tokens[0]
            if any(t.secret != first.secret for t in tokens):
                raise InviteError("join tokens for one mesh carry different secrets")
            membership = cls(first.mesh_id, first.secret)
        else:
            stored = cls.load(data_dir)
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
            return cls(mesh_id=str(data["mesh_id"]), secret=bytes.fromhex(data["secret"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise InviteError(f"{path}: unreadable mesh state ({exc})") from None

    def store(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / MESH_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"mesh_id": self.mesh_id, "secret": self.secret.hex()}, f)
        tmp.replace(path)

    def invite(self, node_id: str, addrs: tuple[str, ...]) -> InviteToken:
        return InviteToken(node_id=node_id, addrs=addrs, mesh_id=self.mesh_id, secret=self.secret)
