"""The host side of the HTTP tunnel, driven as a hostile peer would: it passes on only what the
gateway itself would (the proxied OpenAI routes, within the gateway's body and header caps), answers
anything else with an OpenAI-shaped error and a logged reason, never forwards it, and strips
hop-by-hop headers both ways. Crafted streams go to the handler directly; the last tests go through
a real member's QUIC connection and TLS fast path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from meshllm.net import http_tunnel
from meshllm.serving.openai_api import MAX_BODY_BYTES, MAX_FIELD_BYTES, MAX_HEADERS, PROXIED
from meshllm.wire.framing import StreamKind
from meshllm.wire.messages import TunnelRequest
from tests.support import LogCapture, NodeFactory
from tests.tunnel_support import (
    ANSWER,
    Answer,
    FakeUpstream,
    drive,
    fake_upstream,
    parse_answer,
    route_to,
    tunnel_request,
)

HOP_BY_HOP_REQUEST = {
    "Content-Type": "application/json",
    "Connection": "keep-alive, X-Private",
    "X-Private": "only for the next hop",
    "Keep-Alive": "timeout=5",
    "Proxy-Authorization": "Basic c2VjcmV0",
    "Proxy-Connection": "keep-alive",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Transfer-Encoding": "chunked",
    "Upgrade": "websocket",
    "X-End-To-End": "passed on",
}
STRIPPED = {"x-private", "keep-alive", "proxy-authorization", "proxy-connection", "te",
            "trailer", "transfer-encoding", "upgrade"}  # fmt: skip
# Connection is stripped too; the tunnel's own HTTP client then sends its own ("close") to llama-server.
OWN_CONNECTION = (None, "close")


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeUpstream]:
    """Every model is "served" by a fake llama-server that records what reaches it."""
    with fake_upstream() as up:
        monkeypatch.setattr(http_tunnel, "local_route", route_to(up.port))
        yield up


def refused(answer: Answer, log: LogCapture, upstream: FakeUpstream, status: int, code: str) -> None:
    """The request was answered with ``status``/``code``, logged with a reason, and not forwarded."""
    assert answer.status == status, answer
    error = answer.error()
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert answer.headers == {"Content-Type": "application/json"}
    (record,) = log.find("tunnel.refused")
    assert record["status"] == status and record["code"] == code and record["reason"]
    assert upstream.seen == [], "a refused request reached llama-server"


def test_a_proxied_request_reaches_llama_server(upstream: FakeUpstream) -> None:
    """The control: what the gateway would send goes through, body and all."""
    for method, path in PROXIED:
        body = json.dumps({"model": "tiny", "prompt": "hi"}).encode()
        answer, log = drive(tunnel_request(path, method, body_bytes=len(body)), body)
        assert answer.status == 200 and answer.body == ANSWER
        assert upstream.seen[-1].path == path and upstream.seen[-1].body == body
        assert not log.find("tunnel.refused")
    assert len(upstream.seen) == len(PROXIED)


@pytest.mark.parametrize(
    "path",
    ["/slots", "/props", "/metrics", "/v1/../slots", "/v1/chat/completions/../../props", "/health",
     "/v1/models", "/v1/chat/completions?x=1", "http://127.0.0.1:1/v1/chat/completions", "", "/%2e%2e/slots"],
)  # fmt: skip
def test_off_route_path_is_refused(upstream: FakeUpstream, path: str) -> None:
    answer, log = drive(tunnel_request(path))
    refused(answer, log, upstream, 404, "unknown_route")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "post", "CONNECT"])
def test_wrong_method_is_refused(upstream: FakeUpstream, method: str) -> None:
    answer, log = drive(tunnel_request(method=method))
    refused(answer, log, upstream, 405, "method_not_allowed")


def test_props_post_is_refused(upstream: FakeUpstream) -> None:
    answer, log = drive(tunnel_request("/props", "POST"))
    refused(answer, log, upstream, 404, "unknown_route")


def test_announced_body_over_the_cap_is_refused_unread(upstream: FakeUpstream) -> None:
    # The peer announces a body the gateway would never accept, and sends none of it: no wait.
    answer, log = drive(tunnel_request(body_bytes=MAX_BODY_BYTES + 1), b"", eof=False, timeout=5)
    refused(answer, log, upstream, 413, "body_too_large")


def test_streamed_body_over_the_cap_is_refused(upstream: FakeUpstream) -> None:
    answer, log = drive(tunnel_request(body_bytes=-1), b"x" * (MAX_BODY_BYTES + 1))
    refused(answer, log, upstream, 413, "body_too_large")


def test_content_length_over_the_cap_is_refused(upstream: FakeUpstream) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(MAX_BODY_BYTES + 1)}
    answer, log = drive(tunnel_request(headers=headers))
    refused(answer, log, upstream, 413, "body_too_large")


@pytest.mark.parametrize("body_bytes", [-2, -1000, -(2**62)])
def test_negative_body_size_is_refused(upstream: FakeUpstream, body_bytes: int) -> None:
    answer, log = drive(tunnel_request(body_bytes=body_bytes))
    refused(answer, log, upstream, 400, "bad_content_length")


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "+2", " 2", "0x2", "²", ""])
def test_garbage_content_length_is_refused(upstream: FakeUpstream, value: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": value}
    answer, log = drive(tunnel_request(headers=headers, body_bytes=2), b"{}")
    refused(answer, log, upstream, 400, "bad_content_length")


def test_content_length_that_disagrees_with_the_body_is_refused(upstream: FakeUpstream) -> None:
    # A smaller Content-Length than the body would smuggle the rest to llama-server as a second request.
    smuggled = b"{}GET /slots HTTP/1.1\r\nHost: x\r\n\r\n"
    headers = {"Content-Type": "application/json", "Content-Length": "2"}
    answer, log = drive(tunnel_request(headers=headers, body_bytes=-1), smuggled)
    refused(answer, log, upstream, 400, "bad_content_length")


def test_body_that_ends_early_is_refused(upstream: FakeUpstream) -> None:
    answer, log = drive(tunnel_request(body_bytes=100), b'{"model": "tiny"')
    refused(answer, log, upstream, 400, "body_incomplete")


def test_body_that_never_comes_is_refused(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_tunnel, "BODY_TIMEOUT_S", 0.2)
    answer, log = drive(tunnel_request(body_bytes=10), b"{", eof=False, timeout=10)
    refused(answer, log, upstream, 408, "body_timeout")


def test_too_many_headers_are_refused(upstream: FakeUpstream) -> None:
    headers = {f"X-H{i}": "v" for i in range(MAX_HEADERS + 1)}
    answer, log = drive(tunnel_request(headers=headers))
    refused(answer, log, upstream, 431, "headers_too_large")


def test_oversized_header_value_is_refused(upstream: FakeUpstream) -> None:
    headers = {"Content-Type": "application/json", "X-Big": "v" * (MAX_FIELD_BYTES + 1)}
    answer, log = drive(tunnel_request(headers=headers))
    refused(answer, log, upstream, 431, "headers_too_large")


def test_oversized_header_name_is_refused(upstream: FakeUpstream) -> None:
    headers = {"X" * (MAX_FIELD_BYTES + 1): "v"}
    answer, log = drive(tunnel_request(headers=headers))
    refused(answer, log, upstream, 431, "headers_too_large")


@pytest.mark.parametrize(
    "headers",
    [{"X-A": "1\r\nX-Injected: 2"}, {"X-A": "1\nGET /slots"}, {"X A": "1"}, {"X-A:": "1"}, {"": "1"},
     {"X-A": "\x00"}, {"Content-Type": "a", "content-type": "b"}],
)  # fmt: skip
def test_malformed_headers_are_refused(upstream: FakeUpstream, headers: dict[str, str]) -> None:
    answer, log = drive(tunnel_request(headers=headers))
    refused(answer, log, upstream, 400, "bad_header")


def test_hop_by_hop_headers_are_stripped_both_ways(upstream: FakeUpstream) -> None:
    answer, _ = drive(tunnel_request(headers=HOP_BY_HOP_REQUEST, body_bytes=2), b"{}")
    assert answer.status == 200 and answer.body == ANSWER
    (seen,) = upstream.seen
    arrived = {k.lower() for k in seen.headers}
    assert not arrived & STRIPPED, arrived & STRIPPED
    assert seen.headers.get("Connection") in OWN_CONNECTION
    assert seen.headers.get("X-End-To-End") == "passed on" and seen.body == b"{}"
    assert seen.headers.get("Content-Length") == "2"  # recomputed, not chunked
    # The upstream's Connection header names none of these, so only the end-to-end ones come back.
    assert answer.headers == {"Content-Type": "application/json", "Cache-Control": "no-cache"}


# -- through a real member's connection -------------------------------------------------------------


def open_and_send(
    front: object, host: object, request: TunnelRequest, body: bytes, fast: bool
) -> tuple[Answer, bytes]:
    """From node ``front``, open an HTTP tunnel to ``host`` (QUIC stream or TLS fast path), send
    ``request`` and ``body``, and read the answer to the end of the stream."""
    from meshllm.node import Node

    assert isinstance(front, Node) and isinstance(host, Node) and front.endpoint is not None
    endpoint = front.endpoint

    async def run() -> tuple[Answer, bytes]:
        if fast:
            reader, writer = await endpoint.fast.open(host.node_id, host.addrs, request)
            writer.write(body)
        else:
            reader, writer = await endpoint.open_tunnel(
                host.node_id, host.addrs, StreamKind.HTTP_TUNNEL, request, 10
            )
            writer.write(body)
            writer.write_eof()
        try:
            answer = await parse_answer(reader)
            return answer, await reader.read()  # the host closed the stream: nothing more
        finally:
            if fast:
                writer.close()

    return endpoint.loop_thread.run(asyncio.wait_for(run(), 20), timeout=30)


@pytest.mark.parametrize("fast", [False, True], ids=["quic", "fast-path"])
def test_mesh_tunnel_strips_hop_by_hop_headers(upstream: FakeUpstream, nodes: NodeFactory, fast: bool) -> None:
    host = nodes.start("host")
    front = nodes.start("front", join=(host.invite_token,))
    request = tunnel_request(headers=HOP_BY_HOP_REQUEST, body_bytes=2)
    answer, _ = open_and_send(front, host, request, b"{}", fast)
    assert answer.status == 200 and answer.body == ANSWER
    (seen,) = upstream.seen
    assert not {k.lower() for k in seen.headers} & STRIPPED
    assert seen.headers.get("Connection") in OWN_CONNECTION
    assert seen.headers.get("X-End-To-End") == "passed on"
    assert answer.headers == {"Content-Type": "application/json", "Cache-Control": "no-cache"}


@pytest.mark.parametrize("fast", [False, True], ids=["quic", "fast-path"])
def test_mesh_tunnel_refuses_and_the_host_keeps_serving(
    upstream: FakeUpstream, nodes: NodeFactory, fast: bool
) -> None:
    host = nodes.start("host")
    front = nodes.start("front", join=(host.invite_token,))
    attacks = [
        (tunnel_request("/slots", "GET", body_bytes=0), b"", 404),
        (tunnel_request("/props", "POST", body_bytes=2), b"{}", 404),
        (tunnel_request(body_bytes=MAX_BODY_BYTES + 1), b"", 413),
        (tunnel_request(body_bytes=-5), b"{}", 400),
        (tunnel_request(headers={"Content-Length": "zz"}, body_bytes=2), b"{}", 400),
        (tunnel_request(body_bytes=50), b"{}", 400),  # ends early (FIN on QUIC, close on the fast path)
    ]
    for request, body, status in attacks:
        if fast and request.body_bytes == 50:
            continue  # a TLS stream has no half-close: covered by the QUIC variant and the crafted test
        answer, rest = open_and_send(front, host, request, body, fast)
        assert answer.status == status and answer.error()["message"], (request, answer)
        assert rest == b""
    assert upstream.seen == []
    assert len(nodes.logs["host"].find("tunnel.refused")) == sum(
        1 for r, _, _ in attacks if not (fast and r.body_bytes == 50)
    )
    answer, _ = open_and_send(front, host, tunnel_request(body_bytes=2), b"{}", fast)
    assert answer.status == 200 and len(upstream.seen) == 1  # unharmed
