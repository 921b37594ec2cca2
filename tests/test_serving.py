"""Serving through the mesh with the real llama-server and the official openai client: a solo node,
a node that tunnels to a host, two nodes with two models, restarts, and bad requests."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from meshllm.node import Node
from tests.support import NodeFactory, wait_until

pytestmark = pytest.mark.llama


def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.api_url, api_key="unused", max_retries=0, timeout=60)


def serving(node: Node, model: str) -> bool:
    return model in {m.id for m in client(node).models.list().data}


def chat(node: Node, model: str, stream: bool = False) -> str:
    c = client(node)
    messages: Any = [{"role": "user", "content": "Say hi"}]
    if not stream:
        reply = c.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        return reply.choices[0].message.content or ""
    parts = []
    for chunk in c.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert len(parts) > 1, "a streamed answer arrives in several chunks"
    return "".join(parts)


def complete(node: Node, model: str, stream: bool = False) -> str:
    c = client(node)
    if not stream:
        return (
            c.completions.create(model=model, prompt="Once upon", max_tokens=8, temperature=0).choices[0].text
        )
    return "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=model, prompt="Once upon", max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    )


def test_solo_node_serves_chat_and_completions(nodes: NodeFactory, tiny_gguf: Path) -> None:
    a = nodes.start("a", serve=(str(tiny_gguf),))
    wait_until(lambda: serving(a, "tiny"), timeout=60, what="tiny to be served")
    for stream in (False, True):
        assert chat(a, "tiny", stream)
        assert complete(a, "tiny", stream)
    assert chat(a, "tiny") == chat(a, "tiny", stream=True)  # temperature 0: same text either way
    ready = nodes.logs["a"].find("llama.ready")
    assert ready and ready[0]["kind"] == "llama-server"
    status = json.loads(urllib.request.urlopen(a.console_url + "/api/status", timeout=5).read())
    (model,) = status["models"]
    assert model["name"] == "tiny" and model["state"] == "solo" and model["hosts"] == [a.node_id]


def test_node_without_models_tunnels_to_host(nodes: NodeFactory, tiny_gguf: Path) -> None:
    host = nodes.start("host", serve=(str(tiny_gguf),))
    front = nodes.start("front", join=(host.invite_token,))
    wait_until(lambda: serving(front, "tiny"), timeout=60, what="front to see tiny")
    direct = chat(host, "tiny")
    assert chat(front, "tiny") == direct
    assert chat(front, "tiny", stream=True) == direct
    assert complete(front, "tiny", stream=True) == complete(host, "tiny")
    assert not nodes.logs["front"].find("llama.starting")  # it serves nothing itself


def test_two_models_on_two_nodes_reachable_from_both(
    nodes: NodeFactory, two_tiny_models: tuple[Path, Path]
) -> None:
    a = nodes.start("a", serve=(str(two_tiny_models[0]),))
    b = nodes.start("b", join=(a.invite_token,), serve=(str(two_tiny_models[1]),))
    for node in (a, b):
        wait_until(
            lambda n=node: serving(n, "tiny-a") and serving(n, "tiny-b"), timeout=60, what="both models"
        )
        assert chat(node, "tiny-a") and chat(node, "tiny-b", stream=True)
    # Each node runs only its own model.
    assert [r["key"] for r in nodes.logs["a"].find("llama.ready")] == ["server:tiny-a"]
    assert [r["key"] for r in nodes.logs["b"].find("llama.ready")] == ["server:tiny-b"]


def test_killed_llama_server_is_restarted(nodes: NodeFactory, tiny_gguf: Path) -> None:
    a = nodes.start("a", serve=(str(tiny_gguf),))
    wait_until(lambda: serving(a, "tiny"), timeout=60, what="tiny to be served")
    pid = nodes.logs["a"].find("llama.ready")[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    nodes.logs["a"].wait_for("llama.failed", timeout=10)
    wait_until(lambda: len(nodes.logs["a"].find("llama.ready")) == 2, timeout=60, what="restart")
    assert chat(a, "tiny")


def _post(url: str, body: bytes, method: str = "POST") -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_bad_requests_get_openai_errors_and_node_keeps_serving(nodes: NodeFactory, tiny_gguf: Path) -> None:
    a = nodes.start("a", serve=(str(tiny_gguf),))
    wait_until(lambda: serving(a, "tiny"), timeout=60, what="tiny to be served")
    url = a.api_url + "/chat/completions"
    cases = [
        (b"\x00\xffgarbage", 400),
        (b"[1, 2]", 400),
        (json.dumps({"messages": []}).encode(), 400),
        (json.dumps({"model": "nope", "messages": []}).encode(), 404),
        (b"{" + b" " * (9 * 1024 * 1024) + b"}", 413),
    ]
    for body, expected in cases:
        status, payload, _ = _post(url, body)
        assert status == expected, (body[:40], payload)
        assert payload["error"]["message"]
    status, payload, _ = _post(url, json.dumps({"model": "nope", "messages": []}).encode())
    assert "tiny" in payload["error"]["message"]  # the 404 names what is available
    status, payload, _ = _post(a.api_url + "/models", b"", method="DELETE")
    assert status == 405 and payload["error"]["type"] == "invalid_request_error"
    assert chat(a, "tiny")


def test_model_with_no_ready_host_is_503_with_retry_after(nodes: NodeFactory, tiny_gguf: Path) -> None:
    # A node that wants the model but has far too little VRAM: known, never ready.
    a = nodes.start("a", serve=(str(tiny_gguf),), vram_gb=0.0001, host_wait_s=0.5)
    nodes.logs["a"].wait_for("election.waiting", timeout=10)
    status, payload, headers = _post(a.api_url + "/chat/completions", json.dumps({"model": "tiny"}).encode())
    assert status == 503 and headers.get("Retry-After")
    assert payload["error"]["code"] == "model_not_ready"


def test_a_request_waits_for_a_host_when_the_only_one_just_left(nodes: NodeFactory, tiny_gguf: Path) -> None:
    """The host a front node knows leaves, and another is starting: a request sent in between is held
    (nothing has reached the client yet) and answered by the new host, not refused with a 503."""
    h1 = nodes.start("h1", serve=(str(tiny_gguf),))
    front = nodes.start("front", join=(h1.invite_token,), host_wait_s=60)
    wait_until(lambda: serving(front, "tiny"), timeout=60, what="h1 serving, as front sees it")
    assert complete(front, "tiny")
    h1.stop()  # leaves: front drops its only host of tiny
    wait_until(lambda: not serving(front, "tiny"), timeout=10, what="front to see h1 gone")
    answers: list[str] = []
    asking = threading.Thread(target=lambda: answers.append(complete(front, "tiny")), daemon=True)
    asking.start()
    front_log = nodes.logs["front"]
    nodes.start("h2", join=(front.invite_token,), serve=(str(tiny_gguf),))
    asking.join(90)
    assert answers and answers[0]
    assert front_log.find("gateway.host_waited", model="tiny")


def test_smollm2_answers_with_real_text_through_a_tunnel(nodes: NodeFactory) -> None:
    host = nodes.start("host", serve=("smollm2-135m",))
    front = nodes.start("front", join=(host.invite_token,))
    wait_until(lambda: serving(front, "smollm2-135m"), timeout=120, what="SmolLM2 to be served")
    c = client(front)
    messages: Any = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    reply = c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0)
    text = reply.choices[0].message.content or ""
    assert sum(ch.isalpha() for ch in text) >= 3, text
    assert text == chat_text(host, messages)


def chat_text(node: Node, messages: Any) -> str:
    reply = client(node).chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=16, temperature=0
    )
    return reply.choices[0].message.content or ""


def test_requests_spread_across_hosts_of_a_model(nodes: NodeFactory, tiny_gguf: Path) -> None:
    a = nodes.start("a", serve=(str(tiny_gguf),))
    b = nodes.start("b", join=(a.invite_token,), serve=(str(tiny_gguf),))
    front = nodes.start("front", join=(a.invite_token,))

    def hosts_seen() -> set[str]:
        status = json.loads(urllib.request.urlopen(front.console_url + "/api/status", timeout=5).read())
        return {h for m in status["models"] if m["name"] == "tiny" for h in m["hosts"]}

    wait_until(lambda: hosts_seen() == {a.node_id, b.node_id}, timeout=60, what="front to see both hosts")

    def served_by(name: str) -> int:
        log = nodes.tmp / name / "llama-logs" / "server_tiny.log"
        return log.read_text().count("release:") if log.exists() else 0

    before = {n: served_by(n) for n in ("a", "b")}
    for _ in range(6):
        assert complete(front, "tiny")
    wait_until(
        lambda: sum(served_by(n) - before[n] for n in ("a", "b")) == 6, timeout=10, what="all six answered"
    )
    assert all(served_by(n) - before[n] >= 2 for n in ("a", "b")), "both hosts take a share"
