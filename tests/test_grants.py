"""Capabilities without a network: grants (meshllm.wire.grants), the gate that remembers admitted keys
and keeps revocations (meshllm.wire.gate), and the admission handshake fuzzed with hypothesis."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.wire.admission import AuthError, make_hello
from meshllm.wire.codec import CodecError, decode_as
from meshllm.wire.gate import Gate
from meshllm.wire.grants import (
    ALLOWED,
    ROLES,
    GrantError,
    capability,
    check_grant,
    check_revocation,
    mint_grant,
    parse_ttl,
    sign_revocation,
    stronger,
)
from meshllm.wire.identity import NodeIdentity
from meshllm.wire.invite import MeshMembership, own_grant, role_problem
from meshllm.wire.messages import Grant, Hello

NOW = 1_700_000_000.0
SECRET = b"s" * 32
MESH = MeshMembership.with_secret("m1", SECRET)
LISTENER = NodeIdentity.generate()
DIALLER = NodeIdentity.generate()


def check(grant: Grant, node_id: str = "n", now: float = NOW, remembered: bool = False) -> None:
    check_grant(grant, MESH.authority, MESH.mesh_id, node_id, now, remembered)


# -- ttl -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30m", 1800),
        ("24h", 86400),
        ("7d", 604800),
        ("2w", 1209600),
        ("90", 90),
        ("45s", 45),
        (" 1H ", 3600),
        ("0", 0),
        ("never", 0),
        ("Never", 0),
    ],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1", "1y", "1.5h", "h", "10 days"])
def test_parse_ttl_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(GrantError, match="bad ttl"):
        parse_ttl(text)


# -- grants ----------------------------------------------------------------------------------------------


def test_a_minted_grant_checks_until_it_expires() -> None:
    grant = mint_grant(SECRET, "m1", "client", NOW, ttl_s=60)
    assert grant.expires_at == int(NOW) + 60 and grant.role == "client" and len(grant.token_id) == 32
    check(grant, now=NOW + 59)
    with pytest.raises(GrantError, match="invite expired"):
        check(grant, now=NOW + 60)
    check(grant, now=NOW + 10**6, remembered=True)  # a node admitted before keeps its place


def test_a_grant_with_ttl_zero_never_expires() -> None:
    check(mint_grant(SECRET, "m1", "active", NOW, ttl_s=0), now=NOW * 10)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"role": "active"}, "not signed"),
        ({"expires_at": int(NOW) + 10**6}, "not signed"),
        ({"token_id": "another"}, "not signed"),
        ({"node_id": "n"}, "not signed"),
        ({"signature": b""}, "not signed"),
        ({"signature": b"\x00" * 64}, "not signed"),
        ({"mesh_id": "m2"}, "for mesh 'm2'"),
    ],
)
def test_an_altered_grant_does_not_check(change: dict[str, object], reason: str) -> None:
    grant = dataclasses.replace(mint_grant(SECRET, "m1", "client", NOW), **change)  # type: ignore[arg-type]
    with pytest.raises(GrantError, match=reason):
        check(grant)


def test_a_grant_of_another_authority_does_not_check() -> None:
    with pytest.raises(GrantError, match="not signed by this mesh's authority"):
        check(mint_grant(b"t" * 32, "m1", "active", NOW))


def test_a_bound_grant_is_only_good_for_its_node() -> None:
    grant = mint_grant(SECRET, "m1", "active", NOW, node_id="n")
    check(grant, node_id="n")
    with pytest.raises(GrantError, match="bound to another node"):
        check(grant, node_id="other")


def test_only_the_secret_mints_and_only_known_roles() -> None:
    with pytest.raises(GrantError, match="does not hold the mesh secret"):
        mint_grant(b"", "m1", "client", NOW)
    with pytest.raises(GrantError, match="unknown role"):
        mint_grant(SECRET, "m1", "root", NOW)


@pytest.mark.parametrize("grant_role", ROLES)
@pytest.mark.parametrize("requested", [*ROLES, "root", ""])
def test_role_rules(grant_role: str, requested: str) -> None:
    allowed = {"client": {"client"}, "standby": set(ROLES), "active": set(ROLES)}[grant_role]
    if requested in allowed:
        assert capability(grant_role, requested) == requested
    else:
        with pytest.raises(GrantError):
            capability(grant_role, requested)
    assert set(ALLOWED[grant_role]) == allowed


def test_stronger_orders_by_role_then_expiry() -> None:
    def g(role: str, ttl: int) -> Grant:
        return mint_grant(SECRET, "m1", role, NOW, ttl)

    assert stronger(g("active", 1), g("client", 0)) and stronger(g("standby", 10), g("client", 10))
    assert stronger(g("client", 0), g("client", 10)) and stronger(g("client", 20), g("client", 10))
    assert not stronger(g("client", 10), g("standby", 10))


def test_role_problem_at_start() -> None:
    client, standby = mint_grant(SECRET, "m1", "client", NOW), mint_grant(SECRET, "m1", "standby", NOW)
    assert role_problem("client", client, promoted=False) == ""
    assert "grants client only" in role_problem("active", client, promoted=False)
    assert "grants client only" in role_problem("standby", client, promoted=False)
    assert role_problem("standby", standby, promoted=False) == ""
    assert "only by promotion" in role_problem("active", standby, promoted=False)
    assert role_problem("active", standby, promoted=True) == ""  # a promoted standby re-dials as active


def test_own_grant_of_a_secret_holder_is_bound_and_keeps_the_token_id(tmp_path: Path) -> None:
    token = MESH.invite("inviter", ("h:1",), "active", NOW)
    grant = own_grant(tmp_path, MESH, "me", [token], NOW)
    assert grant is not None and grant.node_id == "me" and grant.expires_at == 0
    assert grant.token_id == token.grant.token_id  # revoking the token revokes this node too
    assert stat.S_IMODE((tmp_path / "grant.json").stat().st_mode) == 0o600
    client = MESH.invite("inviter", ("h:1",), "client", NOW)
    held = own_grant(tmp_path / "c", MeshMembership("m1", MESH.authority), "c", [client], NOW)
    assert held == client.grant  # no secret: the token's own grant
    assert own_grant(tmp_path / "c", MeshMembership("m1", MESH.authority), "c", [], NOW) == client.grant


# -- revocations -----------------------------------------------------------------------------------------


def test_revocations_are_signed_by_the_authority() -> None:
    rev = sign_revocation(SECRET, "m1", "node-x", NOW)
    check_revocation(rev, MESH.authority, "m1")
    for bad, reason in [
        (dataclasses.replace(rev, target="node-y"), "not signed"),
        (dataclasses.replace(rev, mesh_id="m2"), "for mesh"),
        (sign_revocation(b"t" * 32, "m1", "node-x", NOW), "not signed"),
        (sign_revocation(SECRET, "m1", "", NOW), "names nothing"),
    ]:
        with pytest.raises(GrantError, match=reason):
            check_revocation(bad, MESH.authority, "m1")
    with pytest.raises(GrantError, match="does not hold the mesh secret"):
        sign_revocation(b"", "m1", "node-x", NOW)


# -- the gate --------------------------------------------------------------------------------------------


def gate(data_dir: Path | None, membership: MeshMembership = MESH, now: float = NOW) -> Gate:
    return Gate(data_dir, membership, LISTENER, mint_grant(SECRET, "m1", "active", now, 0), clock=lambda: now)


def hello(grant: Grant, role: str = "client", who: NodeIdentity = DIALLER) -> Hello:
    return make_hello(who, MESH.mesh_id, grant, role, LISTENER.node_id)


def test_the_gate_remembers_admitted_keys_past_their_grants_expiry(tmp_path: Path) -> None:
    grant = mint_grant(SECRET, "m1", "client", NOW, ttl_s=60)
    admitted = gate(tmp_path).admit(hello(grant))
    assert (admitted.role, admitted.grant_role, admitted.token_id) == ("client", "client", grant.token_id)
    path = tmp_path / "admitted.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    gate(tmp_path).admit(hello(grant))  # admitted again: nothing new to write
    line = {"node_id": DIALLER.node_id, "role": "client", "token_id": grant.token_id}
    assert [json.loads(x) for x in path.read_text().splitlines()] == [line]
    later = gate(tmp_path, now=NOW + 3600)  # restarted, an hour later: the grant has expired
    assert later.admit(hello(grant)).role == "client"
    stranger = NodeIdentity.generate()  # the same token, a key never admitted: refused
    with pytest.raises(AuthError, match="invite expired"):
        later.admit(hello(grant, who=stranger))


def test_the_role_asked_for_is_capped_by_the_grant(tmp_path: Path) -> None:
    client = mint_grant(SECRET, "m1", "client", NOW)
    with pytest.raises(AuthError, match="a client grant does not allow role active"):
        gate(tmp_path).admit(hello(client, role="active"))
    assert not (tmp_path / "admitted.jsonl").exists()  # a refusal is remembered nowhere


def test_revoked_tokens_and_nodes_are_refused_and_the_list_persists(tmp_path: Path) -> None:
    g = gate(tmp_path)
    token = mint_grant(SECRET, "m1", "client", NOW)
    g.admit(hello(token))
    other = NodeIdentity.generate()
    other_grant = mint_grant(SECRET, "m1", "client", NOW)
    g.admit(hello(other_grant, who=other))
    new, refused = g.apply((g.sign(token.token_id), sign_revocation(b"t" * 32, "m1", other.node_id, NOW)))
    assert refused == ("revocation not signed by this mesh's authority",)
    # The token, and (signed here, for the rest of the mesh) the node this gate admitted with it.
    assert [r.target for r in new] == [token.token_id, DIALLER.node_id]
    with pytest.raises(AuthError, match="is revoked"):
        g.admit(hello(token))
    g.admit(hello(other_grant, who=other))  # the forged revocation changed nothing
    g.apply((g.sign(other.node_id),))
    with pytest.raises(AuthError, match=f"node {other.node_id} is revoked"):
        g.admit(hello(other_grant, who=other))
    again = gate(tmp_path)  # restarted: the list was kept
    assert {r.target for r in again.revocations()} == {token.token_id, DIALLER.node_id, other.node_id}
    assert stat.S_IMODE((tmp_path / "revocations.json").stat().st_mode) == 0o600
    assert again.apply((again.sign(other.node_id),))[0] == ()  # old news is not passed on again


def test_a_node_without_the_secret_cannot_sign_revocations(tmp_path: Path) -> None:
    outsider = gate(tmp_path, MeshMembership("m1", MESH.authority))
    with pytest.raises(AuthError, match="does not hold the mesh secret"):
        outsider.sign("x")


# -- fuzzing the handshake -------------------------------------------------------------------------------

GRANTS = st.builds(
    Grant,
    mesh_id=st.sampled_from(["m1", "m2", ""]) | st.text(max_size=8),
    role=st.sampled_from([*ROLES, "root", ""]),
    token_id=st.text(max_size=40),
    expires_at=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    node_id=st.text(max_size=40),
    signature=st.binary(max_size=80),
)
HELLOS = st.builds(
    Hello,
    mesh_id=st.sampled_from(["m1", ""]) | st.text(max_size=8),
    node_id=st.sampled_from([DIALLER.node_id]) | st.text(max_size=40),
    public_key=st.sampled_from([DIALLER.public_key]) | st.binary(max_size=64),
    role=st.sampled_from([*ROLES, "root"]) | st.text(max_size=10),
    target=st.sampled_from([LISTENER.node_id]) | st.text(max_size=40),
    nonce=st.binary(max_size=40),
    grant=st.none() | GRANTS,
    signature=st.binary(max_size=80),
)
FUZZ_GATE = gate(None)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(HELLOS)
def test_random_hellos_are_refused_with_auth_error_only(h: Hello) -> None:
    with pytest.raises(AuthError):
        FUZZ_GATE.admit(h)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(GRANTS, st.sampled_from([*ROLES, "root"]))
def test_validly_signed_hellos_with_random_grants_are_refused(grant: Grant, role: str) -> None:
    with pytest.raises(AuthError):
        FUZZ_GATE.admit(hello(grant, role=role))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=400))
def test_random_bytes_never_become_an_admission(data: bytes) -> None:
    for payload in (data, b"\x98\x01" + data):  # as is, and as an array of eight tagged Hello
        try:
            h = decode_as(payload, Hello)
        except CodecError:
            continue
        with pytest.raises(AuthError):
            FUZZ_GATE.admit(h)
