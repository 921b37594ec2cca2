"""A graceful stop (SIGTERM) of a host lets the answers it is streaming through its tunnels finish: the
node tells the mesh it leaves, refuses new requests (their requesters retry on another host, as for
any refusal before a first byte) and waits up to ``[timing] drain_s`` before llama-server stops. The
soak (tests/test_soak.py) saw SIGTERM cut streams mid-answer before this."""

from __future__ import annotations

import threading
from pathlib import Path

import openai
import pytest

from tests.support import NodeProcess, ProcessFactory, model_status, wait_until
from tests.test_gateway_failover import FAKE_BIN

pytestmark = pytest.mark.llama


def start_stream(api: str) -> tuple[list[object], threading.Event]:
    """Stream a completion in a thread: its outcome (the finish reason, or the error) lands in the
    list; the event is set at the first chunk."""
    client = openai.OpenAI(base_url=str(api), api_key="unused", max_retries=0, timeout=30)
    first_chunk = threading.Event()
    outcome: list[object] = []

    def read_stream() -> None:
        try:
            finish = None
            for chunk in client.completions.create(model="tiny", prompt="Once", max_tokens=12, stream=True):
                first_chunk.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            outcome.append(finish)
        except openai.APIError as exc:
            outcome.append(exc)
        finally:
            first_chunk.set()

    threading.Thread(target=read_stream, daemon=True).start()
    return outcome, first_chunk


def slow_host_and_asker(
    procs: ProcessFactory, tiny_gguf: Path, events: int, extra: str = ""
) -> tuple[NodeProcess, NodeProcess]:
    """A host whose (fake) llama-server streams ``events`` events 0.25 s apart, and a node asking it."""
    host = procs.start(
        "host",
        extra=f'[models]\nserve = ["{tiny_gguf}"]\n[llama]\nbin_dir = "{FAKE_BIN}"\n' + extra,
        env={"FAKE_LLAMA_MODE": "slow", "SLOW_EVENTS": str(events), "SLOW_GAP_S": "0.25"},
    )
    asker = procs.start("asker", join=(host.token,))
    wait_until(
        lambda: model_status(asker.console_url, "tiny").get("hosts") == [host.node_id], 60, what="hosting"
    )
    return host, asker


def test_sigterm_lets_a_streaming_answer_finish(procs: ProcessFactory, tiny_gguf: Path) -> None:
    host, asker = slow_host_and_asker(procs, tiny_gguf, events=12)
    outcome, first_chunk = start_stream(asker.started["api"])
    assert first_chunk.wait(30)
    host.stop(timeout=30)  # SIGTERM, waits for the process to exit
    wait_until(lambda: outcome, 30, what="the stream to end")
    assert outcome == ["length"], outcome  # the whole answer, not a cut one
    drained = host.events("node.drained")
    assert drained and drained[0]["requests"] == 1 and drained[0]["cut"] == 0
    assert host.proc is not None and host.proc.returncode == 0


def test_an_answer_still_running_when_the_drain_ends_is_an_error_for_the_client(
    procs: ProcessFactory, tiny_gguf: Path
) -> None:
    host, asker = slow_host_and_asker(procs, tiny_gguf, events=40, extra="[timing]\ndrain_s = 0.5\n")
    outcome, first_chunk = start_stream(asker.started["api"])
    assert first_chunk.wait(30)
    host.stop(timeout=30)
    wait_until(lambda: outcome, 30, what="the stream to end")
    assert isinstance(outcome[0], openai.APIError), outcome  # reported as an error, not a normal end
    drained = host.events("node.drained")
    assert drained and drained[0]["cut"] == 1


def test_sigterm_lets_an_answer_to_the_nodes_own_client_finish(procs: ProcessFactory, tiny_gguf: Path) -> None:
    """The same for a client of the stopping node's own API, answered by its own llama-server: an
    answer longer (8 s) than the gateway's own shutdown allows."""
    host, _asker = slow_host_and_asker(procs, tiny_gguf, events=32)
    outcome, first_chunk = start_stream(host.started["api"])
    assert first_chunk.wait(30)
    host.stop(timeout=30)
    wait_until(lambda: outcome, 30, what="the stream to end")
    assert outcome == ["length"], outcome
    drained = host.events("node.drained")
    assert drained and drained[0]["requests"] == 1 and drained[0]["cut"] == 0
