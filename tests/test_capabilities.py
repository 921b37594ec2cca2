"""Capability-scoped invites, driven as an attacker would drive them: what a client token holder
tries beyond its grant (RPC tunnels on QUIC and on the fast path, a forged role, gossip, a tampered
grant), expired tokens, and revocation of a token and of a node through the mesh.

Each refusal is checked where the attacker sees it (a Refused frame, a failed refresh) and where the
operator does (``auth.refused`` / ``auth.revoked`` in the listener's log)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

from meshllm.config import TimingSection
from meshllm.net.endpoint import ALPN
from meshllm.node import Node
from meshllm.wire.admission import make_hello
from meshllm.wire.codec import Message
from meshllm.wire.framing import FrameBuffer, StreamKind, pack_stream_start, read_frame
from meshllm.wire.invite import InviteToken
from meshllm.wire.messages import (
    Gossip,
    Hello,
    PeerAnnouncement,
    Refused,
    RouteRequest,
    RouteTable,
    RpcTunnelRequest,
)
from tests.support import REPO, NodeFactory, wait_until

FAST_REFRESH = TimingSection(route_refresh_s=1.0)


def client_of(nodes: NodeFactory, a: Node, name: str = "c", token: str | None = None) -> Node:
    """A client node joined with a client token of ``a`` (or ``token``), once it has its routes."""
    c = nodes.start(name, join=(token or a.invite("client"),), role="client", timing=FAST_REFRESH)
    nodes.logs[name].wait_for("routes.refreshed", 15)
    return c


def hello_from(node: Node, target: Node, declared: str, **grant_changes: object) -> Hello:
    """A Hello signed with ``node``'s key, declaring a role and carrying its grant (changed as asked)."""
    assert node.gate is not None and node.identity is not None and node.gate.grant is not None
    grant = dataclasses.replace(node.gate.grant, **grant_changes)  # type: ignore[arg-type]
    return make_hello(node.identity, node.gate.mesh_id, grant, declared, target.node_id)


async def _streams(port: int, payloads: list[bytes]) -> list[list[Message]]:
    """Open one raw QUIC connection and, one after the other, a stream per payload; the frames of
    each answer."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    answers = []
    async with connect("127.0.0.1", port, configuration=config) as conn:
        for payload in payloads:
            reader, writer = await conn.create_stream()
            writer.write(payload)
            writer.write_eof()
            answers.append(FrameBuffer().feed(await asyncio.wait_for(reader.read(), 10)))
    return answers


def refusal(frames: list[Message]) -> str:
    assert len(frames) == 1 and isinstance(frames[0], Refused), frames
    return frames[0].reason


def meshllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def config_of(node: Node, tmp: Path) -> Path:
    """A node.toml naming ``node``'s data dir (what ``meshllm revoke --config`` needs)."""
    path = tmp / f"{node.config.node.name}-cli.toml"
    path.write_text(f'[node]\nname = "{node.config.node.name}"\ndata_dir = "{node.config.node.data_dir}"\n')
    return path


# -- what a client token does not allow ------------------------------------------------------------------


def test_a_client_cannot_open_an_rpc_tunnel_on_quic(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    assert c.endpoint is not None

    async def attempt() -> Message:
        assert c.endpoint is not None
        request = RpcTunnelRequest(model="any")
        reader, writer = await c.endpoint.open_tunnel(a.node_id, a.addrs, StreamKind.RPC_TUNNEL, request, 5)
        writer.write_eof()
        return await asyncio.wait_for(read_frame(reader), 10)

    answer = c.endpoint.loop_thread.run(attempt(), timeout=20)
    reason = "RPC_TUNNEL streams are for members only: this connection is client"
    assert answer == Refused(reason=reason)
    nodes.logs["a"].wait_for("auth.refused", 10, peer=c.node_id, reason=reason)


@pytest.mark.parametrize("declared", ["client", "active"])
def test_a_client_cannot_open_an_rpc_tunnel_on_the_fast_path(nodes: NodeFactory, declared: str) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    assert c.endpoint is not None
    c.endpoint.fast.role = declared  # "active": the Hello lies about the role its grant allows

    async def attempt() -> Message:
        assert c.endpoint is not None
        reader, writer = await c.endpoint.fast.open(a.node_id, a.addrs, RpcTunnelRequest(model="any"))
        try:
            return await asyncio.wait_for(read_frame(reader), 10)
        finally:
            writer.close()

    answer = c.endpoint.loop_thread.run(attempt(), timeout=20)
    reason = {
        "client": "RpcTunnelRequest is for members only: this connection is client",
        "active": "a client grant does not allow role active",
    }[declared]
    assert answer == Refused(reason=reason)
    nodes.logs["a"].wait_for("auth.refused", 10, reason=reason, path="fast")


def test_a_client_forging_role_active_is_refused(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    forged = hello_from(c, a, "active")
    gossip = pack_stream_start(StreamKind.GOSSIP, forged, Gossip(announcements=()))
    routes = pack_stream_start(StreamKind.ROUTE_REQUEST, forged, RouteRequest())
    for answer in asyncio.run(_streams(a.quic_port, [gossip])) + asyncio.run(_streams(a.quic_port, [routes])):
        assert refusal(answer) == "a client grant does not allow role active"
    assert a.peer_ids() == set()


def test_a_client_cannot_gossip_or_announce_itself_serving(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    me = PeerAnnouncement(
        node_id=c.node_id, name="c", role="active", addrs=c.addrs, vram_bytes=1, models=("m",), serving=("m",)
    )
    # Gossip as the first stream, with an honest Hello: refused at admission.
    first = pack_stream_start(StreamKind.GOSSIP, hello_from(c, a, "client"), Gossip(announcements=(me,)))
    (answer,) = asyncio.run(_streams(a.quic_port, [first]))
    assert refusal(answer) == "gossip is for members only: a client may not gossip"
    # Admitted for routes first, then gossip on the same connection: refused too.
    routes = pack_stream_start(StreamKind.ROUTE_REQUEST, hello_from(c, a, "client"), RouteRequest())
    then = pack_stream_start(StreamKind.GOSSIP, Gossip(announcements=(me,)))
    table, gossip = asyncio.run(_streams(a.quic_port, [routes, then]))
    assert isinstance(table[-1], RouteTable)
    assert refusal(gossip) == "passive nodes do not gossip"
    assert a.peer_ids() == set()


def test_a_tampered_grant_is_refused(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    promoted = hello_from(c, a, "active", role="active")  # signed by c's key, but not by the authority
    (answer,) = asyncio.run(
        _streams(a.quic_port, [pack_stream_start(StreamKind.GOSSIP, promoted, Gossip(()))])
    )
    assert refusal(answer) == "grant not signed by this mesh's authority"
    nodes.logs["a"].wait_for("auth.refused", 10, reason="grant not signed by this mesh's authority")
    assert a.peer_ids() == set()


# -- expiry ----------------------------------------------------------------------------------------------


def test_an_expired_token_is_refused_but_a_node_admitted_before_keeps_working(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    assert a.membership is not None and a.gate is not None
    expired = a.membership.invite(a.node_id, a.addrs, "client", time.time() - 7200, 3600).encode()
    nodes.start("late", join=(expired,), role="client", timing=FAST_REFRESH)
    failed = nodes.logs["late"].wait_for("routes.refresh_failed", 15)
    assert "invite expired" in failed["reason"]
    nodes.logs["a"].wait_for(
        "auth.refused", 10, reason="invite expired: ask for a new token (meshllm invite)"
    )

    token = a.invite("client", ttl_s=600)
    c = client_of(nodes, a, token=token)
    a.gate.clock = lambda: time.time() + 3600  # an hour on: c's token has expired
    c.stop()
    again = client_of(nodes, a, token=token)  # same data dir, same key: remembered, admitted
    assert again.node_id == c.node_id
    nodes.start("newcomer", join=(token,), role="client", timing=FAST_REFRESH)  # a new key: refused
    assert "invite expired" in nodes.logs["newcomer"].wait_for("routes.refresh_failed", 15)["reason"]


# -- revocation ------------------------------------------------------------------------------------------


def test_revoking_a_token_and_a_node_cuts_them_off_across_the_mesh(
    nodes: NodeFactory, tmp_path: Path
) -> None:
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(
        lambda: a.peer_ids() == {b.node_id} and b.peer_ids() == {a.node_id}, 15, what="a and b to meet"
    )
    text = a.invite("client")
    c = client_of(nodes, a, token=text)
    token = InviteToken.decode(text)

    out = meshllm("revoke", token.grant.token_id, "--config", str(config_of(a, tmp_path)))
    assert out.returncode == 0, out.stderr
    assert f"revoked {token.grant.token_id} (and 1 node(s) admitted with it: {c.node_id})" in out.stdout
    # c's live connection to a is closed, and its next Hellos are refused.
    nodes.logs["a"].wait_for("auth.revoked", 10, peer=c.node_id)
    nodes.logs["c"].wait_for("routes.refresh_failed", 15)
    # The revocation reached b through the mesh, with the node a admitted with it.
    nodes.logs["b"].wait_for("mesh.revoked", 10, target=token.grant.token_id)
    nodes.logs["b"].wait_for("mesh.revoked", 10, target=c.node_id)
    via_b = dataclasses.replace(token, node_id=b.node_id, addrs=b.addrs).encode()
    nodes.start("c2", join=(via_b,), role="client", timing=FAST_REFRESH)  # the token, a new key
    assert "is revoked" in nodes.logs["c2"].wait_for("routes.refresh_failed", 15)["reason"]
    c.stop()
    nodes.start("c", join=(via_b,), role="client", timing=FAST_REFRESH)  # c's key, at b
    assert "is revoked" in nodes.logs["c"].wait_for("routes.refresh_failed", 15)["reason"]

    # A node id: d, joined with a token nobody revoked.
    d = client_of(nodes, a, "d")
    out = meshllm("revoke", d.node_id, "--config", str(config_of(a, tmp_path)))
    assert out.returncode == 0 and f"revoked {d.node_id}" in out.stdout, out.stderr
    nodes.logs["a"].wait_for("auth.revoked", 10, peer=d.node_id)
    nodes.logs["b"].wait_for("mesh.revoked", 10, target=d.node_id)
    assert f"node {d.node_id} is revoked" in nodes.logs["d"].wait_for("routes.refresh_failed", 15)["reason"]
    # b stays a member throughout.
    assert a.peer_ids() == {b.node_id}


def test_only_a_holder_of_the_mesh_secret_revokes(nodes: NodeFactory, tmp_path: Path) -> None:
    a = nodes.start("a")
    c = client_of(nodes, a)
    out = meshllm("revoke", a.node_id, "--config", str(config_of(c, tmp_path)))
    assert out.returncode == 1 and "does not hold the mesh secret" in out.stderr
    assert not nodes.logs["a"].find("mesh.revoked")
