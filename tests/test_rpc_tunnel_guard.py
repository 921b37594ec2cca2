"""RPC tunnels reach a worker's rpc-server only from the host of its plan, and only while that plan
stands: llama.cpp's rpc-server gives whoever connects arbitrary reads and writes of its memory.

Three in-process member nodes: ``w`` has an "rpc-server" for model ``m`` (a loopback echo server
standing in for ggml-rpc-server), ``h`` is the host the plan names, ``x`` another member. Each node's
tunnel listeners are opened as the election opens them (EnsureRpcListeners), and ``w`` is told its
plan's host as its election tells it (AllowRpcHost). Both carriers: the TLS fast path and QUIC.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from meshllm.node import Node
from meshllm.wire.messages import AllowRpcHost, EnsureRpcListeners, LocalServing, Seed
from tests.support import NodeFactory, wait_until

MODEL = "m"


@contextmanager
def echo_server() -> Iterator[int]:
    """A loopback TCP server that echoes each connection's bytes (one thread per connection)."""
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def listener_port(nodes: NodeFactory, name: str, worker: Node) -> int:
    record = nodes.logs[name].wait_for("rpc.listening", 20, model=MODEL, worker=worker.node_id)
    return int(record["port"])


def open_tunnel(nodes: NodeFactory, node: Node, name: str, worker: Node) -> int:
    node.directory.tell(
        "transport", EnsureRpcListeners(model=MODEL, workers=(Seed(worker.node_id, worker.addrs),))
    )
    return listener_port(nodes, name, worker)


def echoes(port: int, payload: bytes = b"ggml-rpc hello") -> bool:
    """True when ``payload`` comes back through the tunnel; False when the tunnel is closed on us."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return False
            if not data:
                return False
            got += data
        return got == payload


@pytest.fixture(params=["fast-path", "quic"])
def carrier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "quic":
        monkeypatch.setenv("MESHLLM_FAST_PATH", "0")
    return str(request.param)


def mesh(nodes: NodeFactory) -> tuple[Node, Node, Node]:
    w = nodes.start("w")
    h = nodes.start("h", join=(w.invite_token,))
    x = nodes.start("x", join=(w.invite_token,))
    wait_until(lambda: w.peer_ids() == {h.node_id, x.node_id}, 20, what="w to know h and x")
    return w, h, x


def refused(nodes: NodeFactory, **fields: Any) -> dict[str, Any]:
    return nodes.logs["w"].wait_for("rpc.refused", 20, model=MODEL, **fields)


def test_only_the_plans_host_reaches_a_workers_rpc_server(nodes: NodeFactory, carrier: str) -> None:
    w, h, x = mesh(nodes)
    with echo_server() as rpc_port:
        w.directory.tell("router", LocalServing(model=MODEL, port=rpc_port, kind="rpc-server"))

        # No plan makes w a worker yet: nobody gets through, not even h.
        h_port = open_tunnel(nodes, h, "h", w)
        assert not echoes(h_port)
        assert "no split worker" in refused(nodes, peer=h.node_id)["reason"]

        # w's plan names h as the host: h gets through, x (a member, but not the host) does not.
        w.directory.tell("transport", AllowRpcHost(model=MODEL, host=h.node_id))
        assert wait_until(lambda: echoes(h_port), 10, what="h's tunnel to echo")
        x_port = open_tunnel(nodes, x, "x", w)
        assert not echoes(x_port)
        assert "is not the host" in refused(nodes, peer=x.node_id)["reason"]


def test_an_open_tunnel_is_cut_when_the_plan_changes(nodes: NodeFactory, carrier: str) -> None:
    w, h, x = mesh(nodes)
    with echo_server() as rpc_port:
        w.directory.tell("router", LocalServing(model=MODEL, port=rpc_port, kind="rpc-server"))
        w.directory.tell("transport", AllowRpcHost(model=MODEL, host=h.node_id))
        h_port = open_tunnel(nodes, h, "h", w)
        with socket.create_connection(("127.0.0.1", h_port), timeout=10) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            # The plan now names x as the host: h's open tunnel is closed, x's opens.
            w.directory.tell("transport", AllowRpcHost(model=MODEL, host=x.node_id))
            nodes.logs["w"].wait_for("rpc.tunnel_cut", 20, model=MODEL, peer=h.node_id)

            def closed() -> bool:
                try:
                    s.sendall(b"more")
                    return s.recv(4) == b""
                except OSError:
                    return True

            assert wait_until(closed, 10, what="h's tunnel to close")
        assert echoes(open_tunnel(nodes, x, "x", w))
