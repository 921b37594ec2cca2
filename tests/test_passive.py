"""Passive nodes (clients, standby): they get routes instead of gossiping, cost the active side only a
QUIC connection, follow hosts coming and going, and survive the death of the host they use."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

from meshllm.config import TimingSection
from meshllm.net.endpoint import ALPN
from meshllm.node import Node
from meshllm.placement import host_for_client
from meshllm.wire.framing import FrameBuffer, StreamKind
from meshllm.wire.invite import InviteToken, MeshMembership
from meshllm.wire.messages import GetStatus, Refused, StatusReply
from tests.support import NodeFactory, NodeProcess, ProcessFactory, wait_until

pytestmark = pytest.mark.llama
FAST_REFRESH = TimingSection(route_refresh_s=1.0)
FAST_REFRESH_TOML = "[timing]\nroute_refresh_s = 2.0\n"


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def served(api_url: str) -> set[str]:
    return set(m["id"] for m in http_json(api_url + "/models")["data"])


def complete(api_url: str, model: str) -> str:
    c = openai.OpenAI(base_url=api_url, api_key="unused", max_retries=0, timeout=30)
    return c.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0).choices[0].text


def table_hosts(node: Node, model: str) -> set[str]:
    status = http_json(node.console_url + "/api/status")
    return {h for m in status["models"] if m["name"] == model for h in m["hosts"]}


def test_client_uses_the_mesh_without_joining_it(procs: ProcessFactory, tiny_gguf: Path) -> None:
    serve = f'[models]\nserve = ["{tiny_gguf}"]\n'
    a = procs.start("a", extra=serve)
    b = procs.start("b", join=(a.token,), extra=serve)
    client = procs.start("client", join=(a.token_for("client"),), node_extra='role = "client"', extra=FAST_REFRESH_TOML)
    for host in (a, b):
        host.wait_event("llama.ready", timeout=60)
    api = str(client.started["api"])

    def both_hosts() -> bool:
        status = http_json(client.console_url + "/api/status")
        return any(set(m["hosts"]) == {a.node_id, b.node_id} for m in status["models"])

    wait_until(lambda: "tiny" in served(api) and both_hosts(), timeout=90, what="client to see both hosts")
    expected = complete(api, "tiny")
    for host in (a, b):
        status = http_json(host.console_url + "/api/status")
        assert client.node_id not in {p["node_id"] for p in status["peers"]}
        assert len(status["peers"]) == 1  # only the other active node
    assert http_json(a.console_url + "/api/status")["passive_connections"] >= 1
    assert not a.events("peer.joined", peer=client.node_id) and not b.events(
        "peer.joined", peer=client.node_id
    )

    used_id = host_for_client(client.node_id, "tiny", [a.node_id, b.node_id])
    used: NodeProcess = a if used_id == a.node_id else b
    used.kill9()
    assert complete(api, "tiny") == expected  # retried on the other host, not lost
    assert complete(api, "tiny") == expected


def test_client_table_follows_hosts(nodes: NodeFactory, tiny_gguf: Path) -> None:
    a = nodes.start("a", serve=(str(tiny_gguf),))
    client = nodes.start("client", join=(a.invite("client"),), role="client", timing=FAST_REFRESH)
    wait_until(lambda: table_hosts(client, "tiny") == {a.node_id}, timeout=60, what="client to see a")
    b = nodes.start("b", join=(a.invite_token,), serve=(str(tiny_gguf),))
    wait_until(lambda: table_hosts(client, "tiny") == {a.node_id, b.node_id}, timeout=30, what="new host b")
    b.stop(leave=True)
    wait_until(lambda: table_hosts(client, "tiny") == {a.node_id}, timeout=30, what="b gone from the table")
    assert complete(client.api_url, "tiny")
    assert a.status().peers == ()  # the client never was a peer


def test_death_notices_reach_passive_nodes(nodes: NodeFactory, tiny_gguf: Path) -> None:
    a = nodes.start("a", serve=(str(tiny_gguf),))
    b = nodes.start("b", join=(a.invite_token,), serve=(str(tiny_gguf),))
    client = nodes.start("client", join=(a.invite("client"),), role="client", timing=FAST_REFRESH)
    wait_until(lambda: table_hosts(client, "tiny") == {a.node_id, b.node_id}, timeout=60, what="both hosts")
    complete(client.api_url, "tiny")  # opens connections to the host it uses
    b_id = b.node_id
    b.stop(leave=False)  # silent death: a's heartbeat notices and pushes the notice to the client
    nodes.logs["client"].wait_for("routes.host_died", timeout=10, host=b_id)
    assert table_hosts(client, "tiny") == {a.node_id}


def test_forged_grant_gets_a_refusal_and_no_table(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    real = InviteToken.decode(a.invite_token)
    forger = MeshMembership.with_secret(real.mesh_id, b"y" * 32)  # the mesh id, not its authority
    forged = forger.invite(real.node_id, real.addrs, "client", time.time())
    client = nodes.start("client", join=(forged.encode(),), role="client")
    failed = nodes.logs["client"].wait_for("routes.refresh_failed", timeout=10)
    assert "grant not signed by this mesh's authority" in failed["reason"]
    assert nodes.logs["a"].wait_for("auth.refused", timeout=5)["reason"] == (
        "grant not signed by this mesh's authority"
    )
    assert http_json(client.console_url + "/api/status")["models"] == []
    assert not nodes.logs["client"].find("routes.refreshed")


async def _route_stream(port: int, payload: bytes, stall: bool) -> bytes:
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    async with connect("127.0.0.1", port, configuration=config) as conn:
        reader, writer = await conn.create_stream()
        writer.write(payload)
        if not stall:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)


@pytest.mark.parametrize("stall", [False, True], ids=["garbage", "stall"])
def test_bad_route_request_is_closed_and_node_unaffected(nodes: NodeFactory, stall: bool) -> None:
    a = nodes.start("a")
    assert a.endpoint is not None
    a.endpoint.control.timeout_s = 1.0
    payload = bytes([StreamKind.ROUTE_REQUEST]) + (b"" if stall else b"\x00\x00\x00\x03\xc1\xc1\xc1")
    answer = asyncio.run(_route_stream(a.quic_port, payload, stall))
    frames = FrameBuffer().feed(answer)
    assert frames and all(isinstance(f, Refused) for f in frames)
    assert nodes.logs["a"].find("stream.rejected")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, timeout=10, what="a still admits peers")
    assert a.directory.ask("registry", GetStatus(), StatusReply).node_id == a.node_id
