"""No secret in any log or status: a running mesh (two members, a client, a request served through a
tunnel) writes its logs and answers its status, and none of it contains the mesh secret, the
authority's private key, or an invite token, in any spelling a log might use."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import openai
import pytest
from cryptography.hazmat.primitives import serialization

from meshllm.wire.grants import authority_key
from meshllm.wire.invite import MeshMembership
from tests.support import ProcessFactory, console_status, model_status, wait_until

pytestmark = pytest.mark.llama


def spellings(secret: bytes) -> set[str]:
    return {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    }


def test_no_log_line_or_status_field_carries_a_secret(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a = procs.start("a", extra=f'[models]\nserve = ["{tiny_gguf}"]\n[log]\nfile = true\n')
    b = procs.start("b", join=(a.token,), extra="[log]\nfile = true\n")
    client_token = a.token_for("client")
    c = procs.start("c", join=(client_token,), node_extra='role = "client"')
    wait_until(lambda: model_status(c.console_url, "tiny").get("hosts") == [a.node_id], 60, what="c to route")
    answer = openai.OpenAI(base_url=str(c.started["api"]), api_key="unused", max_retries=0, timeout=30)
    assert answer.completions.create(model="tiny", prompt="Once", max_tokens=3).choices[0].text

    membership = MeshMembership.load(procs.tmp / "a")
    assert membership is not None and membership.secret
    private = authority_key(membership.secret).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    needles = spellings(membership.secret) | spellings(private)
    needles |= {a.token, client_token, b.token_for("client")} - {""}

    texts: dict[str, str] = {}
    for proc in (a, b, c):
        texts[f"{proc.log_path.name} (stderr)"] = proc.log_path.read_text(errors="replace")
        texts[f"{proc.log_path.name} /api/status"] = json.dumps(console_status(proc.console_url))
        with urllib.request.urlopen(str(proc.started["api"]) + "/models", timeout=10) as r:
            texts[f"{proc.log_path.name} /v1/models"] = r.read().decode()
    for path in procs.tmp.rglob("*.log"):
        texts[str(path.relative_to(procs.tmp))] = path.read_text(errors="replace")
    assert any("node.log" in name for name in texts), "the nodes' own log files were read too"
    leaks = [(name, n[:12]) for name, text in texts.items() for n in needles if n in text]
    assert leaks == [], f"secrets found in: {leaks}"
