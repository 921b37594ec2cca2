"""The access log: one ``gateway.served`` line per API request on the node that took it, one
``tunnel.served`` line on the host that answered it through a tunnel, each saying where the answer came
from, how long its first byte and the whole took, and how it ended. (How cut answers end is checked
where they are made: tests/test_client_disconnect.py, tests/test_gateway_failover.py.)"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from meshllm.node import Node
from meshllm.serving.request_log import RequestRecord
from tests.support import NodeFactory, wait_until


def test_a_record_says_what_a_request_did() -> None:
    record = RequestRecord(path="/v1/chat/completions", started=100.0, model="m" * 300)
    record.tried("node:aaaaaaaaaaaa", "")
    record.tried("local:4242", "local")
    record.status = 200
    record.first_byte_at = 100.0125
    assert record.fields(now=100.5) == {
        "path": "/v1/chat/completions",
        "model": "m" * 100,
        "status": 200,
        "target": "local:4242",
        "via": "local",
        "tries": 2,
        "first_byte_ms": 12.5,
        "ms": 500.0,
        "end": "whole",
    }
    refused = RequestRecord(path="/v1/completions", started=1.0)
    refused.end = "refused"
    assert refused.fields(now=1.25) == {"path": "/v1/completions", "ms": 250.0, "end": "refused"}
    error = RequestRecord(path="/v1/embeddings", started=1.0)
    error.status = 404
    assert error.fields(now=1.0)["end"] == "error"  # the gateway's own answer: nothing was relayed


def client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.api_url, api_key="unused", max_retries=0, timeout=60)


@pytest.mark.llama
def test_each_request_is_logged_where_it_was_taken_and_where_it_was_answered(
    nodes: NodeFactory, tiny_gguf: Path
) -> None:
    host = nodes.start("host", serve=(str(tiny_gguf),))
    front = nodes.start("front", join=(host.invite_token,))
    wait_until(
        lambda: "tiny" in {m.id for m in client(front).models.list().data},
        timeout=60,
        what="front to see tiny",
    )
    messages: Any = [{"role": "user", "content": "Say hi"}]
    stream = client(front).chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert [chunk for chunk in stream]
    client(host).completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client(front).chat.completions.create(model="nope", messages=messages)
    too_big = urllib.request.Request(front.api_url + "/chat/completions", data=b"{" + b" " * (9 << 20) + b"}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(too_big, timeout=30)
    assert refused.value.code == 413

    tunnelled = nodes.logs["front"].wait_for("gateway.served", 10, path="/v1/chat/completions", model="tiny")
    assert tunnelled["status"] == 200 and tunnelled["end"] == "whole"
    assert tunnelled["target"] == f"node:{host.node_id[:12]}" and tunnelled["via"] == "fast"
    assert 0 < tunnelled["first_byte_ms"] <= tunnelled["ms"]
    answered = nodes.logs["host"].wait_for("tunnel.served", 10, path="/v1/chat/completions")
    assert answered["peer"] == front.node_id and answered["model"] == "tiny"
    assert answered["status"] == 200 and answered["end"] == "whole"
    assert 0 < answered["first_byte_ms"] <= answered["ms"] <= tunnelled["ms"]

    local = nodes.logs["host"].wait_for("gateway.served", 10, path="/v1/completions")
    assert local["status"] == 200 and local["end"] == "whole" and local["via"] == "local"
    assert local["target"].startswith("local:") and local["first_byte_ms"] <= local["ms"]

    unknown = nodes.logs["front"].wait_for("gateway.served", 10, model="nope")
    assert unknown["status"] == 404 and unknown["end"] == "error" and "target" not in unknown
    refused_line = nodes.logs["front"].wait_for("gateway.served", 10, status=413)  # aiohttp refused it
    assert refused_line["end"] == "error" and "model" not in refused_line
    # One line per request, on the node that took it: the host's own request is not logged by front.
    assert len(nodes.logs["front"].find("gateway.served")) == 3
    assert len(nodes.logs["host"].find("tunnel.served")) == 1
