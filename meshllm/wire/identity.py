"""Node identity: an Ed25519 key kept in the data dir, the node id derived from it, and the
self-signed certificate QUIC presents, so a peer can check that a certificate belongs to the id it
claims."""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

KEY_FILE = "node.key"


def node_id_of(public_key: bytes) -> str:
    """The node id: the first 16 bytes of SHA-256 over the raw 32-byte public key, in hex."""
    return hashlib.sha256(public_key).digest()[:16].hex()


def public_key_of_certificate(cert: x509.Certificate) -> bytes | None:
    """The raw Ed25519 public key in a certificate, or None if it holds another kind of key."""
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeIdentity:
    """A node's key pair and the id and certificate that follow from it."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> NodeIdentity:
        """Load ``data_dir/node.key``, creating it (mode 0600) on first start."""
        path = data_dir / KEY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 key")
            return cls(key)
        data_dir.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        tmp.replace(path)
        return identity

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def certificate(self) -> x509.Certificate:
        """A self-signed certificate for this key, named after the node id."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.node_id)])
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(self.private_key, None)
        )
