"""Tests for admission and membership: meshllm.wire.admission, meshllm.wire.identity and meshllm.wire.invite."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import stat
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.wire.admission import (
    Admitted,
    AuthError,
    admit,
    answer_hello,
    hello_payload,
    make_hello,
    verify_answer,
)
from meshllm.wire.codec import decode, encode
from meshllm.wire.grants import mint_grant
from meshllm.wire.identity import NodeIdentity, node_id_of, public_key_of_certificate, verify_signature
from meshllm.wire.invite import InviteError, InviteToken, MeshMembership
from meshllm.wire.messages import Grant, Hello, Refused

NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def alice() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture(scope="module")
def bob() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture(scope="module")
def mesh() -> MeshMembership:
    return MeshMembership.with_secret("mesh-1", b"s" * 32)


@pytest.fixture(scope="module")
def grant(mesh: MeshMembership) -> Grant:
    return mint_grant(mesh.secret, mesh.mesh_id, "active", NOW)


def verify(hello: Hello, mesh: MeshMembership, own_id: str, now: float = NOW) -> Admitted:
    """The listener's check with nothing remembered or revoked."""
    return admit(hello, mesh.mesh_id, mesh.authority, own_id, now, lambda n: False, lambda n, t: "")


def resign(identity: NodeIdentity, hello: Hello, **changes: object) -> Hello:
    """A Hello with ``changes`` whose signature is recomputed (valid crypto, other fields chosen)."""
    h = dataclasses.replace(hello, **changes)  # type: ignore[arg-type]
    payload = hello_payload(h.mesh_id, h.node_id, h.public_key, h.role, h.target, h.nonce, h.grant)
    return dataclasses.replace(h, signature=identity.sign(payload))


# -- Hello ------------------------------------------------------------------------------------------------------


def test_valid_hello_verifies(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant
) -> None:
    hello = make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id)
    assert hello.node_id == alice.node_id and hello.public_key == alice.public_key and hello.grant == grant
    assert hello.mesh_id == mesh.mesh_id and hello.target == bob.node_id and hello.role == "active"
    assert len(hello.nonce) >= 16
    assert verify(hello, mesh, bob.node_id) == Admitted(alice.node_id, "active", "active", grant.token_id)
    # It survives the wire.
    back = decode(encode(hello))
    assert back == hello
    verify(back, mesh, bob.node_id)  # type: ignore[arg-type]


def test_the_answer_echoes_the_nonce_and_carries_no_grant(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant
) -> None:
    hello = make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id)
    answer = answer_hello(bob, mesh.mesh_id, "active", hello)
    assert answer.grant is None and answer.nonce == hello.nonce
    verify_answer(answer, mesh.mesh_id, alice.node_id, bob.node_id, hello)
    other = make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id)
    with pytest.raises(AuthError, match="nonce"):  # an old answer replayed to a new Hello
        verify_answer(answer, mesh.mesh_id, alice.node_id, bob.node_id, other)
    carol = NodeIdentity.generate()
    with pytest.raises(AuthError, match=f"expected node {carol.node_id}"):
        verify_answer(answer, mesh.mesh_id, alice.node_id, carol.node_id, hello)
    with pytest.raises(AuthError, match="no grant"):  # an answer is no admission
        verify(answer, mesh, alice.node_id)


def test_each_hello_has_a_fresh_nonce(alice: NodeIdentity, bob: NodeIdentity, grant: Grant) -> None:
    nonces = {make_hello(alice, "mesh-1", grant, "active", bob.node_id).nonce for _ in range(5)}
    assert len(nonces) == 5


def test_wrong_mesh_id(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant) -> None:
    hello = make_hello(alice, "mesh-2", grant, "active", bob.node_id)
    with pytest.raises(AuthError, match="wrong mesh"):
        verify(hello, mesh, bob.node_id)


def test_grant_of_another_authority(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership) -> None:
    forged = mint_grant(b"t" * 32, mesh.mesh_id, "active", NOW)
    hello = make_hello(alice, mesh.mesh_id, forged, "active", bob.node_id)
    with pytest.raises(AuthError, match="grant not signed by this mesh's authority"):
        verify(hello, mesh, bob.node_id)


def test_target_another_node(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant
) -> None:
    hello = make_hello(alice, mesh.mesh_id, grant, "active", "somebody-else")
    with pytest.raises(AuthError, match="another node"):
        verify(hello, mesh, bob.node_id)
    # A Hello for bob cannot be replayed at a third node.
    carol = NodeIdentity.generate()
    with pytest.raises(AuthError, match="another node"):
        verify(make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id), mesh, carol.node_id)


def test_node_id_not_matching_key(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant
) -> None:
    hello = make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id)
    forged = resign(alice, hello, node_id=bob.node_id)  # valid signature, a node id not of this key
    with pytest.raises(AuthError, match="does not match its public key"):
        verify(forged, mesh, bob.node_id)


def test_bad_signature(alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant) -> None:
    hello = make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id)
    payload = hello_payload(
        hello.mesh_id, hello.node_id, hello.public_key, hello.role, hello.target, hello.nonce, hello.grant
    )
    # Signed by someone else's key (a grant holder impersonating alice).
    impostor = dataclasses.replace(hello, signature=bob.sign(payload))
    with pytest.raises(AuthError, match="bad signature"):
        verify(impostor, mesh, bob.node_id)
    for sig in (
        b"",
        b"\x00" * 64,
        hello.signature[:-1],
        bytes([hello.signature[0] ^ 1]) + hello.signature[1:],
    ):
        with pytest.raises(AuthError, match="bad signature"):
            verify(dataclasses.replace(hello, signature=sig), mesh, bob.node_id)


def test_malformed_public_key_is_refused(bob: NodeIdentity, mesh: MeshMembership, grant: Grant) -> None:
    bogus = b"\x01" * 5  # not 32 bytes, with a node id that matches it: refused, no crash
    fake = NodeIdentity.generate()
    hello = make_hello(fake, mesh.mesh_id, grant, "active", bob.node_id)
    forged = resign(fake, hello, public_key=bogus, node_id=node_id_of(bogus))
    with pytest.raises(AuthError, match="bad signature"):
        verify(forged, mesh, bob.node_id)


@pytest.mark.parametrize("length", [0, 1, 8, 15])
def test_short_nonce(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant, length: int
) -> None:
    hello = resign(alice, make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id), nonce=b"n" * length)
    with pytest.raises(AuthError, match="nonce too short"):
        verify(hello, mesh, bob.node_id)
    verify(resign(alice, hello, nonce=b"n" * 16), mesh, bob.node_id)


@pytest.mark.parametrize(
    "changes",
    [
        {"role": "client"},
        {"nonce": b"x" * 16},
        {"nonce": b"x" * 32},
        {"public_key": NodeIdentity.generate().public_key},
        {"grant": None},
    ],
    ids=["role", "nonce", "longer-nonce", "public_key", "no-grant"],
)
def test_altered_field_breaks_the_hello(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership, grant: Grant, changes: dict[str, object]
) -> None:
    hello = dataclasses.replace(make_hello(alice, mesh.mesh_id, grant, "active", bob.node_id), **changes)  # type: ignore[arg-type]
    with pytest.raises(AuthError):
        verify(hello, mesh, bob.node_id)


def test_a_grant_cannot_be_swapped_into_a_signed_hello(
    alice: NodeIdentity, bob: NodeIdentity, mesh: MeshMembership
) -> None:
    client = mint_grant(mesh.secret, mesh.mesh_id, "client", NOW)
    active = mint_grant(mesh.secret, mesh.mesh_id, "active", NOW)
    hello = make_hello(alice, mesh.mesh_id, client, "client", bob.node_id)
    with pytest.raises(AuthError, match="bad signature"):
        verify(dataclasses.replace(hello, grant=active, role="active"), mesh, bob.node_id)


def test_auth_error_text_fits_a_refused_frame(
    alice: NodeIdentity, mesh: MeshMembership, grant: Grant
) -> None:
    hello = make_hello(alice, mesh.mesh_id, grant, "active", "x")
    with pytest.raises(AuthError) as info:
        verify(hello, mesh, "y")
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


@st.composite
def tokens(draw: st.DrawFn) -> InviteToken:
    mesh = MeshMembership.with_secret(draw(st.text(max_size=20)), draw(SECRETS))
    role = draw(st.sampled_from(["client", "standby", "active"]))
    addrs = tuple(draw(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=4)))
    ttl = draw(st.integers(min_value=0, max_value=10**8))
    return mesh.invite(draw(st.text(max_size=40)), addrs, role, NOW, ttl)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(tokens())
def test_invite_token_round_trip(token: InviteToken) -> None:
    text = token.encode()
    assert isinstance(text, str)
    assert "=" not in text and "+" not in text and "/" not in text
    assert InviteToken.decode(text) == token
    assert InviteToken.decode(f"  {text}\n") == token  # pasted with whitespace
    assert (token.secret != b"") == (token.grant.role == "active")  # the secret only in active tokens


def test_membership_invite_round_trip(mesh: MeshMembership, alice: NodeIdentity) -> None:
    token = mesh.invite(alice.node_id, ("127.0.0.1:7000", "[::1]:7000"), "client", NOW, 3600)
    back = InviteToken.decode(token.encode())
    assert back.mesh_id == mesh.mesh_id and back.authority == mesh.authority and back.secret == b""
    assert back.grant.role == "client" and back.grant.expires_at == int(NOW) + 3600
    assert back.node_id == alice.node_id and back.addrs == ("127.0.0.1:7000", "[::1]:7000")
    active = InviteToken.decode(mesh.invite(alice.node_id, ("h:1",), "active", NOW).encode())
    assert active.secret == mesh.secret


def test_only_a_secret_holder_invites() -> None:
    outsider = MeshMembership("m", MeshMembership.found().authority)
    with pytest.raises(InviteError, match="does not hold the mesh secret"):
        outsider.invite("n", ("h:1",), "client", NOW)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


MESH = MeshMembership.with_secret("m", b"k" * 16)
GOOD = MESH.invite("n", ("h:1",), "client", NOW)


def _raw(token: InviteToken) -> str:
    """A token encoded without the checks ``InviteToken.decode`` runs."""
    return _b64(encode(token))


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "malformed"),
        ("   ", "malformed"),
        ("!!!!", "malformed"),
        ("a", "base64"),  # one character more than a multiple of four
        ("abcde", "base64"),
        ("é", "base64"),  # not ASCII
        (GOOD.encode()[:-5], "malformed|base64"),  # truncated
        (GOOD.encode()[:10], "malformed|base64"),
        (GOOD.encode() + "AAAA", "malformed|base64"),  # trailing junk
        (_b64(b"not msgpack \xc1"), "malformed"),
        (_b64(msgpack.packb({"node_id": "n"})), "malformed"),
        (_b64(encode(Refused("hi"))), "malformed"),  # another message type
        (_b64(msgpack.packb([60, "n", ["h:1"], "m", b"k" * 16])), "older meshllm"),  # a v1 token
        (_b64(msgpack.packb([63, "n", ["h:1"], "m"])), "malformed"),  # fields missing
        (_b64(msgpack.packb([63, 5, ["h:1"], "m", b"a" * 32, [], b""])), "malformed"),  # int node id
        (_b64(b"\x00" * 5000), "malformed"),  # over the token size cap
        (_raw(dataclasses.replace(GOOD, addrs=())), "no addresses"),
        (_raw(dataclasses.replace(GOOD, authority=b"x")), "authority key is malformed"),
        (_raw(dataclasses.replace(GOOD, mesh_id="other")), "grant is malformed"),
        (_raw(dataclasses.replace(GOOD, grant=dataclasses.replace(GOOD.grant, role="root"))), "malformed"),
        (_raw(dataclasses.replace(GOOD, grant=dataclasses.replace(GOOD.grant, role="active"))), "not signed"),
        (_raw(dataclasses.replace(GOOD, secret=b"k" * 16)), "carries no secret"),
        (_raw(dataclasses.replace(MESH.invite("n", ("h:1",), "active", NOW), secret=b"k" * 15)), "too short"),
        (
            _raw(dataclasses.replace(MESH.invite("n", ("h:1",), "active", NOW), secret=b"j" * 16)),
            "does not match",
        ),
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


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_any_base64_payload_decodes_or_raises_invite_error(data: bytes) -> None:
    for payload in (data, b"\x96\x3f" + data):  # as is, and as an array of six tagged as a token
        try:
            InviteToken.decode(_b64(payload))
        except InviteError:
            pass


# -- membership ------------------------------------------------------------------------------------------------


def test_resolve_founds_a_mesh_and_persists_it(tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = MeshMembership.resolve(data, [])
    assert first.mesh_id and len(first.secret) >= 16 and len(first.authority) == 32
    path = data / "mesh.json"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored == {
        "mesh_id": first.mesh_id,
        "authority": first.authority.hex(),
        "secret": first.secret.hex(),
    }
    assert MeshMembership.load(data) == first
    assert MeshMembership.resolve(data, []) == first  # reloads the same mesh
    assert MeshMembership.resolve(tmp_path / "e", []) != first  # a different data dir founds another


def test_a_v1_mesh_file_still_loads(tmp_path: Path) -> None:
    (tmp_path / "mesh.json").write_text(json.dumps({"mesh_id": "old", "secret": (b"o" * 32).hex()}))
    assert MeshMembership.load(tmp_path) == MeshMembership.with_secret("old", b"o" * 32)


def test_resolve_adopts_a_tokens_mesh(tmp_path: Path) -> None:
    mesh = MeshMembership.with_secret("joined", b"j" * 32)
    tokens = [mesh.invite("a", ("a:1",), "active", NOW), mesh.invite("b", ("b:1",), "client", NOW)]
    got = MeshMembership.resolve(tmp_path, tokens)
    assert got == mesh
    assert MeshMembership.load(tmp_path) == mesh
    assert MeshMembership.resolve(tmp_path, []) == mesh  # a restart without tokens stays in it


def test_a_client_token_gives_no_secret(tmp_path: Path) -> None:
    mesh = MeshMembership.with_secret("joined", b"j" * 32)
    got = MeshMembership.resolve(tmp_path, [mesh.invite("a", ("a:1",), "client", NOW)])
    assert got == MeshMembership("joined", mesh.authority, b"")
    assert "6a6a" not in (tmp_path / "mesh.json").read_text()


def test_resolve_with_a_token_replaces_a_founded_mesh(tmp_path: Path) -> None:
    MeshMembership.resolve(tmp_path, [])
    mesh = MeshMembership.with_secret("joined", b"j" * 32)
    assert MeshMembership.resolve(tmp_path, [mesh.invite("a", ("a:1",), "active", NOW)]) == mesh
    assert MeshMembership.load(tmp_path) == mesh


def test_resolve_rejects_tokens_naming_different_meshes(tmp_path: Path) -> None:
    one = MeshMembership.with_secret("one", b"1" * 32).invite("a", ("a:1",), "active", NOW)
    two = MeshMembership.with_secret("two", b"2" * 32).invite("b", ("b:1",), "active", NOW)
    with pytest.raises(InviteError, match="different meshes"):
        MeshMembership.resolve(tmp_path, [one, two])
    assert not (tmp_path / "mesh.json").exists()


def test_resolve_rejects_tokens_with_different_authorities(tmp_path: Path) -> None:
    one = MeshMembership.with_secret("m", b"1" * 32).invite("a", ("a:1",), "active", NOW)
    two = MeshMembership.with_secret("m", b"2" * 32).invite("b", ("b:1",), "active", NOW)
    with pytest.raises(InviteError, match="different authority keys"):
        MeshMembership.resolve(tmp_path, [one, two])


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", "{}", '{"mesh_id": "m", "secret": "zz"}', '{"mesh_id": 1}', '{"mesh_id": "m"}'],
)
def test_load_unreadable_mesh_state(tmp_path: Path, content: str) -> None:
    (tmp_path / "mesh.json").write_text(content)
    with pytest.raises(InviteError, match="unreadable mesh state"):
        MeshMembership.load(tmp_path)


def test_load_without_state_is_none(tmp_path: Path) -> None:
    assert MeshMembership.load(tmp_path) is None


def test_found_makes_distinct_meshes() -> None:
    a, b = MeshMembership.found(), MeshMembership.found()
    assert a.mesh_id != b.mesh_id and a.secret != b.secret and a.authority != b.authority
    assert len(a.secret) >= 16
