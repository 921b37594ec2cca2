"""Pooled fast-path tunnels: a gateway sends its next request to a host on the TLS connection its
last answer came on (one TCP+TLS handshake, not one per request), and a pooled connection the host
has closed meanwhile is replaced without the client seeing anything. Answers keep their bytes: a
streamed answer through the tunnel is the same SSE stream as from llama-server itself."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest

from tests.support import NodeProcess, ProcessFactory, model_status, wait_until

pytestmark = pytest.mark.llama


def complete(proc: NodeProcess, stream: bool) -> str:
    client = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=30)
    if stream:
        chunks = client.completions.create(
            model="tiny", prompt="Once", max_tokens=8, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)
    return client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0).choices[0].text


def tunnel_ends(asker: NodeProcess, port: int) -> list[psutil._common.sconn]:
    """The asker's TCP connections to the host's fast-path port (live, closing or in TIME_WAIT)."""
    assert asker.proc is not None
    return [c for c in psutil.net_connections(kind="tcp") if c.raddr and c.raddr.port == port]


def pair(procs: ProcessFactory, tiny_gguf: Path, **host_env: str) -> tuple[NodeProcess, NodeProcess, int]:
    host = procs.start("host", extra=f'[models]\nserve = ["{tiny_gguf}"]\n', env=host_env or None)
    asker = procs.start("asker", join=(host.token,))
    wait_until(
        lambda: model_status(asker.console_url, "tiny").get("hosts") == [host.node_id], 60, what="routes"
    )
    return host, asker, int(host.started["quic_port"])


def test_sequential_requests_share_one_tunnel_connection(procs: ProcessFactory, tiny_gguf: Path) -> None:
    _, asker, port = pair(procs, tiny_gguf)
    texts = [complete(asker, stream=s) for s in (True, False, True, True)]
    assert all(texts), texts
    assert texts[0] == texts[2] == texts[3] == texts[1], "streamed and whole answers agree (temperature 0)"
    ends = tunnel_ends(asker, port)
    assert len(ends) == 1, f"one pooled connection for four requests, saw {ends}"
    assert ends[0].status == psutil.CONN_ESTABLISHED


def test_a_pooled_connection_the_host_closed_is_replaced(procs: ProcessFactory, tiny_gguf: Path) -> None:
    _, asker, port = pair(procs, tiny_gguf, MESHLLM_FAST_IDLE_S="1")
    assert complete(asker, stream=True)
    wait_until(
        lambda: not [c for c in tunnel_ends(asker, port) if c.status == psutil.CONN_ESTABLISHED],
        15,
        what="the host to close the idle pooled connection",
    )
    mark = len(asker.records())
    assert complete(asker, stream=True), "an answer on a fresh connection"
    assert not [r for r in asker.records()[mark:] if r.get("event") == "gateway.retry"], "no host was failed"


def test_a_streamed_answer_keeps_llama_servers_bytes(procs: ProcessFactory, tiny_gguf: Path) -> None:
    host, asker, _ = pair(procs, tiny_gguf)
    llama_port = int(host.wait_event("llama.ready", 60, kind="llama-server")["port"])
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 8, "temperature": 0, "stream": True}

    def events(base: str) -> list[dict[str, object]]:
        request = urllib.request.Request(
            base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            lines = [line for line in response.read().split(b"\n\n") if line.strip()]
        out = []
        for line in lines:
            payload = json.loads(line.removeprefix(b"data: ")) if line != b"data: [DONE]" else {"done": True}
            for volatile in ("id", "created", "timings", "system_fingerprint", "usage"):
                payload.pop(volatile, None)
            out.append(payload)
        return out

    direct = events(f"http://127.0.0.1:{llama_port}")
    api = str(asker.started["api"]).removesuffix("/v1")
    assert events(api) == direct
    assert events(str(host.started["api"]).removesuffix("/v1")) == direct


FAKE_BIN = Path(__file__).parent / "data" / "fake-llama"


@pytest.mark.parametrize("fast_path", ["1", "0"], ids=["fast-path", "quic"])
def test_a_client_that_closes_at_done_has_not_left_mid_answer(
    procs: ProcessFactory, tiny_gguf: Path, fast_path: str
) -> None:
    """The openai library closes its connection at ``data: [DONE]``; llama-server's terminating chunk
    can come after that (here 0.3 s after). The answer was whole: no ``gateway.client_left`` (and
    the tunnel is kept, not reset: tests/test_body_pump.py)."""
    late_end = {"FAKE_LLAMA_MODE": "slow", "SLOW_EVENTS": "2", "SLOW_GAP_S": "0", "SLOW_END_GAP_S": "0.3"}
    host = procs.start(
        "host", extra=f'[models]\nserve = ["{tiny_gguf}"]\n[llama]\nbin_dir = "{FAKE_BIN}"\n', env=late_end
    )
    asker = procs.start("asker", join=(host.token,), env={"MESHLLM_FAST_PATH": fast_path})
    wait_until(lambda: model_status(asker.console_url, "tiny").get("hosts") == [host.node_id], 60, what="routes")
    for proc in (asker, host):  # through a tunnel, and the host's own gateway
        mark = len(proc.records())
        assert [complete(proc, stream=True) for _ in range(3)] == ["OnceOnce"] * 3
        # The fake serves one request at a time: the third began after the second's last chunk was
        # sent, so the first two answers' ends have been seen by now.
        left = [r for r in proc.records()[mark:] if r.get("event") == "gateway.client_left"]
        assert left == [], left
