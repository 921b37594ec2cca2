"""Tests for admission and membership: meshllm.wire.admission, meshllm.wire.identity and meshllm.wire.invite."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import stat
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.wire.admission import AuthError, hello_payload, make_hello, verify_hello
from meshllm.wire.codec import decode, encode
from meshllm.wire.identity import NodeIdentity, node_id_of, public_key_of_certificate, verify_signature
from meshllm.wire.invite import InviteError, InviteToken, MeshMembership
from meshllm.wire.messages import Hello, Refused


@pytest.fixture(scope="module")
def alice() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture(scope="module")
def bob() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture(scope="module")
def mesh() -> MeshMembership:
    return MeshMembership(mesh_id="mesh-1", secret=b"s" * 32)


def resign(identity: NodeIdentity, secret: bytes, hello: Hello, **changes: object) -> Hello:
    """A Hello with ``changes`` whose mac and signature are recomputed (valid crypto, other fields chosen)."""
    h = dataclasses.replace(hello, **changes)  # type: ignore[arg-type]
    payload = hello_payload(h.mesh_id, h.node_id, h.public_key, h.role, h.target, h.nonce)
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return dataclasses.replace(h, mac=mac, signature=identity.sign(payload + mac))


# -- Hello ------------------------------------------------------------------------------------------------------


def test_valid_hello_verifies(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    hello = make_hello(alice, mesh, "active", bob.node_id)
    assert hello.node_id == alice.node_id and hello.public_key == alice.public_key
    assert hello.mesh_id == mesh.mesh_id and hello.target == bob.node_id and hello.role == "active"
    assert len(hello.nonce) >= 16
    verify_hello(hello, mesh, bob.node_id)
    verify_hello(hello, mesh, bob.node_id, expected_node=alice.node_id)
    # It survives the wire.
    back = decode(encode(hello))
    assert back == hello
    verify_hello(back, mesh, bob.node_id)  # type: ignore[arg-type]


def test_each_hello_has_a_fresh_nonce(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    nonces = {make_hello(alice, mesh, "active", bob.node_id).nonce for _ in range(5)}
    assert len(nonces) == 5


def test_wrong_mesh_id(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    other = MeshMembership("mesh-2", mesh.secret)
    hello = make_hello(alice, other, "active", bob.node_id)
    with pytest.raises(AuthError, match="wrong mesh"):
        verify_hello(hello, mesh, bob.node_id)


def test_wrong_secret(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    other = MeshMembership(mesh.mesh_id, b"t" * 32)
    hello = make_hello(alice, other, "active", bob.node_id)
    with pytest.raises(AuthError, match="bad mesh secret"):
        verify_hello(hello, mesh, bob.node_id)


def test_target_another_node(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    hello = make_hello(alice, mesh, "active", "somebody-else")
    with pytest.raises(AuthError, match="another node"):
        verify_hello(hello, mesh, bob.node_id)
    # A Hello for bob cannot be replayed at a third node.
    carol = NodeIdentity.generate()
    with pytest.raises(AuthError, match="another node"):
        verify_hello(make_hello(alice, mesh, "active", bob.node_id), mesh, carol.node_id)


def test_node_id_not_matching_key(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    hello = make_hello(alice, mesh, "active", bob.node_id)
    # Valid mac and signature, but a claimed node id that is not the hash of the key.
    forged = resign(alice, mesh.secret, hello, node_id=bob.node_id)
    with pytest.raises(AuthError, match="does not match its public key"):
        verify_hello(forged, mesh, bob.node_id)


def test_bad_signature(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    hello = make_hello(alice, mesh, "active", bob.node_id)
    payload = hello_payload(
        hello.mesh_id, hello.node_id, hello.public_key, hello.role, hello.target, hello.nonce
    )
    # Signed by someone else's key (a mesh member who knows the secret, impersonating alice).
    impostor = dataclasses.replace(hello, signature=bob.sign(payload + hello.mac))
    with pytest.raises(AuthError, match="bad signature"):
        verify_hello(impostor, mesh, bob.node_id)
    for sig in (
        b"",
        b"\x00" * 64,
        hello.signature[:-1],
        bytes([hello.signature[0] ^ 1]) + hello.signature[1:],
    ):
        with pytest.raises(AuthError, match="bad signature"):
            verify_hello(dataclasses.replace(hello, signature=sig), mesh, bob.node_id)


def test_malformed_public_key_is_refused(bob: NodeIdentity, mesh: MeshMembership) -> None:
    # A key that is not 32 bytes, with a node id that matches it and a valid mac: still refused, no crash.
    bogus = b"\x01" * 5
    fake = NodeIdentity.generate()
    hello = make_hello(fake, mesh, "active", bob.node_id)
    forged = resign(fake, mesh.secret, hello, public_key=bogus, node_id=node_id_of(bogus))
    with pytest.raises(AuthError, match="bad signature"):
        verify_hello(forged, mesh, bob.node_id)


def test_expected_node_mismatch(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    carol = NodeIdentity.generate()
    hello = make_hello(alice, mesh, "active", bob.node_id)
    with pytest.raises(AuthError, match=f"expected node {carol.node_id}"):
        verify_hello(hello, mesh, bob.node_id, expected_node=carol.node_id)


@pytest.mark.parametrize("length", [0, 1, 8, 15])
def test_short_nonce(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, length: int) -> None:
    hello = resign(alice, mesh.secret, make_hello(alice, mesh, "active", bob.node_id), nonce=b"n" * length)
    with pytest.raises(AuthError, match="nonce too short"):
        verify_hello(hello, mesh, bob.node_id)
    verify_hello(resign(alice, mesh.secret, hello, nonce=b"n" * 16), mesh, bob.node_id)


@pytest.mark.parametrize(
    "changes",
    [
        {"role": "client"},
        {"nonce": b"x" * 16},
        {"nonce": b"x" * 32},
        {"public_key": NodeIdentity.generate().public_key},
        {"mac": b"\x00" * 32},
        {"mac": b""},
    ],
    ids=["role", "nonce", "longer-nonce", "public_key", "mac", "empty-mac"],
)
def test_altered_field_breaks_the_hello(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, changes: dict[str, object]
) -> None:
    hello = dataclasses.replace(make_hello(alice, mesh, "active", bob.node_id), **changes)  # type: ignore[arg-type]
    with pytest.raises(AuthError):
        verify_hello(hello, mesh, bob.node_id)


def test_role_change_with_recomputed_mac_still_fails_the_signature(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership
) -> None:
    # Somebody who knows the mesh secret but not alice's key re-macs an altered Hello.
    hello = make_hello(alice, mesh, "active", bob.node_id)
    changed = dataclasses.replace(hello, role="standby")
    payload = hello_payload(
        changed.mesh_id, changed.node_id, changed.public_key, changed.role, changed.target, changed.nonce
    )
    mac = hmac.new(mesh.secret, payload, hashlib.sha256).digest()
    with pytest.raises(AuthError, match="bad signature"):
        verify_hello(dataclasses.replace(changed, mac=mac), mesh, bob.node_id)


def test_auth_error_text_fits_a_refused_frame(alice: NodeIdentity, mesh: MeshMembership) -> None:
    hello = make_hello(alice, mesh, "active", "x")
    with pytest.raises(AuthError) as info:
        verify_hello(hello, mesh, "y")
    assert decode(encode(Refused(str(info.value)))) == Refused(str(info.value))


# -- identity ------------------------------------------------------------------------------------------------


def test_load_or_create_persists_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data" / "nested"
    first = NodeIdentity.load_or_create(data)
    key_file = data / "node.key"
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = NodeIdentity.load_or_create(data)
    assert again.node_id == first.node_id
    assert again.public_key == first.public_key
    # 32 lowercase hex digits: the first 16 bytes of SHA-256 over the public key.
    assert first.node_id == hashlib.sha256(first.public_key).digest()[:16].hex()
    assert first.node_id == node_id_of(first.public_key)
    assert not list(data.glob("*.tmp"))
    other = NodeIdentity.load_or_create(tmp_path / "other")
    assert other.node_id != first.node_id


def test_load_or_create_rejects_a_non_ed25519_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = generate_private_key(SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "node.key").write_bytes(pem)
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        NodeIdentity.load_or_create(tmp_path)


def test_certificate_maps_to_the_node_id(alice: NodeIdentity) -> None:
    cert = alice.certificate()
    key = public_key_of_certificate(cert)
    assert key == alice.public_key
    assert key is not None and node_id_of(key) == alice.node_id
    assert alice.node_id in cert.subject.rfc4514_string()


def test_certificate_with_another_key_type_maps_to_none() -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = generate_private_key(SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert public_key_of_certificate(cert) is None


def test_verify_signature(alice: NodeIdentity, bob: NodeIdentity) -> None:
    sig = alice.sign(b"data")
    assert verify_signature(alice.public_key, sig, b"data")
    assert not verify_signature(alice.public_key, sig, b"datA")
    assert not verify_signature(bob.public_key, sig, b"data")
    assert not verify_signature(b"short", sig, b"data")
    assert not verify_signature(alice.public_key, b"", b"data")


# -- invite tokens ---------------------------------------------------------------------------------------------

SECRETS = st.binary(min_size=16, max_size=64)
TOKENS = st.builds(
    InviteToken,
    node_id=st.text(max_size=40),
    addrs=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4).map(tuple),
    mesh_id=st.text(max_size=20),
    secret=SECRETS,
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(TOKENS)
def test_invite_token_round_trip(token: InviteToken) -> None:
    text = token.encode()
    assert isinstance(text, str)
    assert "=" not in text and "+" not in text and "/" not in text
    assert InviteToken.decode(text) == token
    assert InviteToken.decode(f"  {text}\n") == token  # pasted with whitespace


def test_membership_invite_round_trip(mesh: MeshMembership, alice: NodeIdentity) -> None:
    token = mesh.invite(alice.node_id, ("127.0.0.1:7000", "[::1]:7000"))
    back = InviteToken.decode(token.encode())
    assert back.mesh_id == mesh.mesh_id and back.secret == mesh.secret
    assert back.node_id == alice.node_id and back.addrs == ("127.0.0.1:7000", "[::1]:7000")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


GOOD = InviteToken("n", ("h:1",), "m", b"k" * 16).encode()


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "malformed"),
        ("   ", "malformed"),
        ("!!!!", "malformed"),
        ("a", "base64"),  # one character more than a multiple of four
        ("abcde", "base64"),
        ("é", "base64"),  # not ASCII
        (GOOD[:-5], "malformed"),  # truncated
        (GOOD[:10], "malformed"),
        (GOOD + "AAAA", "malformed"),  # trailing junk
        (_b64(b"not msgpack \xc1"), "malformed"),
        (_b64(msgpack.packb({"node_id": "n"})), "malformed"),
        (_b64(encode(Refused("hi"))), "malformed"),  # another message type
        (_b64(msgpack.packb([60, "n", ["h:1"], "m"])), "malformed"),  # missing secret
        (_b64(msgpack.packb([60, "n", ["h:1"], "m", "k" * 16])), "malformed"),  # str secret
        (_b64(msgpack.packb([60, 5, ["h:1"], "m", b"k" * 16])), "malformed"),  # int node id
        (_b64(msgpack.packb([60, "n", "h:1", "m", b"k" * 16])), "malformed"),  # str addrs
        (_b64(b"\x00" * 5000), "malformed"),  # over the token size cap
        (InviteToken("n", (), "m", b"k" * 16).encode(), "no addresses"),
        (InviteToken("n", ("h:1",), "m", b"k" * 15).encode(), "too short"),
    ],
)
def test_bad_tokens_raise_invite_error(text: str, reason: str) -> None:
    with pytest.raises(InviteError, match=reason):
        InviteToken.decode(text)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=80))
def test_any_text_decodes_or_raises_invite_error(text: str) -> None:
    try:
        InviteToken.decode(text)
    except InviteError:
        pass


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=80))
def test_any_base64_payload_decodes_or_raises_invite_error(data: bytes) -> None:
    try:
        InviteToken.decode(_b64(data))
    except InviteError:
        pass


# -- membership ------------------------------------------------------------------------------------------------


def test_resolve_founds_a_mesh_and_persists_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = MeshMembership.resolve(data, [])
    assert first.mesh_id and len(first.secret) >= 16
    path = data / "mesh.json"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored == {"mesh_id": first.mesh_id, "secret": first.secret.hex()}
    assert MeshMembership.load(data) == first
    assert MeshMembership.resolve(data, []) == first  # reloads the same mesh
    assert MeshMembership.resolve(tmp_path / "e", []) != first  # a different data dir founds another


def test_resolve_adopts_a_tokens_mesh(tmp_path: Path) -> None:
    mesh = MeshMembership("joined", b"j" * 32)
    tokens = [mesh.invite("a", ("a:1",)), mesh.invite("b", ("b:1",))]
    got = MeshMembership.resolve(tmp_path, tokens)
    assert got == mesh
    assert MeshMembership.load(tmp_path) == mesh
    assert MeshMembership.resolve(tmp_path, []) == mesh  # a restart without tokens stays in it


def test_resolve_with_a_token_replaces_a_founded_mesh(tmp_path: Path) -> None:
    MeshMembership.resolve(tmp_path, [])
    mesh = MeshMembership("joined", b"j" * 32)
    assert MeshMembership.resolve(tmp_path, [mesh.invite("a", ("a:1",))]) == mesh
    assert MeshMembership.load(tmp_path) == mesh


def test_resolve_rejects_tokens_naming_different_meshes(tmp_path: Path) -> None:
    one = MeshMembership("one", b"1" * 32).invite("a", ("a:1",))
    two = MeshMembership("two", b"2" * 32).invite("b", ("b:1",))
    with pytest.raises(InviteError, match="different meshes"):
        MeshMembership.resolve(tmp_path, [one, two])
    assert not (tmp_path / "mesh.json").exists()


def test_resolve_rejects_tokens_with_different_secrets(tmp_path: Path) -> None:
    one = MeshMembership("m", b"1" * 32).invite("a", ("a:1",))
    two = MeshMembership("m", b"2" * 32).invite("b", ("b:1",))
    with pytest.raises(InviteError, match="different secrets"):
        MeshMembership.resolve(tmp_path, [one, two])


@pytest.mark.parametrize(
    "content", ["not json", "[]", "{}", '{"mesh_id": "m", "secret": "zz"}', '{"mesh_id": 1}']
)
def test_load_unreadable_mesh_state(tmp_path: Path, content: str) -> None:
    (tmp_path / "mesh.json").write_text(content)
    with pytest.raises(InviteError, match="unreadable mesh state"):
        MeshMembership.load(tmp_path)


def test_load_without_state_is_none(tmp_path: Path) -> None:
    assert MeshMembership.load(tmp_path) is None


def test_found_makes_distinct_meshes() -> None:
    a, b = MeshMembership.found(), MeshMembership.found()
    assert a.mesh_id != b.mesh_id and a.secret != b.secret
    assert len(a.secret) >= 16
