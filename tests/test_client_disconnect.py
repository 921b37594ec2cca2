"""A client that goes away mid-stream stops the generation on the host: the tunnel is reset end to
end (TCP reset on the fast path, QUIC STOP_SENDING on the fallback), the host closes its llama-server
connection, and llama-server's slots are idle again - instead of generating to max_tokens for nobody."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support import NodeProcess, ProcessFactory, model_status, wait_until

pytestmark = pytest.mark.llama


def busy_slots(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/slots", timeout=5) as r:
        return sum(1 for slot in json.load(r) if slot.get("is_processing"))


def start_and_leave(proc: NodeProcess, llama_port: int) -> float:
    """Stream a long completion through ``proc``, read a little, hang up: seconds until the host's
    llama-server has no busy slot."""
    api = urllib.parse.urlparse(str(proc.started["api"]))
    conn = http.client.HTTPConnection(api.hostname, api.port, timeout=30)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 4000, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert response.read1(65536)
    assert busy_slots(llama_port) == 1, "generating"
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream (the response's file
    response.close()  # holds the socket too: shutdown, not just close, really hangs up)
    conn.close()
    left = time.monotonic()
    wait_until(lambda: busy_slots(llama_port) == 0, 10, interval=0.05, what="the host's llama-server to go idle")
    return time.monotonic() - left


@pytest.mark.parametrize("carrier", ["fast-path", "quic"])
def test_a_client_that_leaves_mid_stream_stops_the_generation(
    procs: ProcessFactory, tiny_gguf: Path, carrier: str
) -> None:
    host = procs.start("host", extra=f'[models]\nserve = ["{tiny_gguf}"]\n')
    env = {"MESHLLM_FAST_PATH": "0"} if carrier == "quic" else None
    asker = procs.start("asker", join=(host.token,), env=env)
    wait_until(lambda: model_status(asker.console_url, "tiny").get("hosts") == [host.node_id], 60, what="routes")
    llama_port = int(host.wait_event("llama.ready", 60, kind="llama-server")["port"])
    through_tunnel = start_and_leave(asker, llama_port)
    local = start_and_leave(host, llama_port)
    print(f"{carrier}: idle {through_tunnel:.2f} s after the client left (tunnel), {local:.2f} s (local)")
    assert host.events("tunnel.requester_left") and asker.events("gateway.client_left")
    # The access log says how each ended, on the node that took it and on the host that answered it.
    via = "fast" if carrier == "fast-path" else "quic"
    wait_until(lambda: asker.events("gateway.served", end="client_left", via=via), 10, what="asker's log line")
    wait_until(lambda: host.events("tunnel.served", end="requester_left"), 10, what="the host's log line")
    wait_until(lambda: host.events("gateway.served", end="client_left", via="local"), 10, what="host's own")
