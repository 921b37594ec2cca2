"""A host that fails while answering, as the soak test saw it: before the first byte of the body the
request goes to another host (the client never gets an empty 200); after it, the client's OpenAI
library reports an error, never a normal end. The failing host runs a fake llama-server
(tests/data/fake-llama) that sends its streaming headers and then dies, before or after one event."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.support import NodeProcess, ProcessFactory, model_status, wait_until

pytestmark = pytest.mark.llama

FAKE_BIN = Path(__file__).parent / "data" / "fake-llama"


def serve(model: Path, fake: bool = False) -> str:
    llama = f'[llama]\nbin_dir = "{FAKE_BIN}"\n' if fake else ""
    return f'[models]\nserve = ["{model}"]\n' + llama


def stream(proc: NodeProcess) -> str:
    client = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=30)
    chunks = client.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_a_host_that_dies_before_its_first_byte_is_skipped(procs: ProcessFactory, tiny_gguf: Path) -> None:
    bad = procs.start("bad", extra=serve(tiny_gguf, fake=True), env={"FAKE_LLAMA_MODE": "before"})
    good = procs.start("good", join=(bad.token,), extra=serve(tiny_gguf))
    asker = procs.start("asker", join=(bad.token,))
    wait_until(
        lambda: set(model_status(asker.console_url, "tiny").get("hosts", [])) == {bad.node_id, good.node_id},
        60,
        what="both hosts serving, as the asker sees it",
    )
    # Whichever host the rotation tries first, every answer is whole; at least one went to bad first.
    for proc in (asker, bad):  # through a tunnel, and through bad's own gateway (its local llama-server)
        mark = len(proc.records())

        def retried(proc: NodeProcess = proc, mark: int = mark) -> bool:
            assert stream(proc), "an empty answer"
            # bad's llama-server died before its first byte: the answer came from good all the same
            return any(r.get("event") == "gateway.retry" for r in proc.records()[mark:])

        wait_until(retried, 60, what=f"{proc.config.stem} to retry past the dying host")


def test_an_answer_cut_after_its_first_byte_is_an_error_for_the_client(
    procs: ProcessFactory, tiny_gguf: Path
) -> None:
    bad = procs.start("bad", extra=serve(tiny_gguf, fake=True), env={"FAKE_LLAMA_MODE": "after"})
    asker = procs.start("asker", join=(bad.token,))
    wait_until(lambda: model_status(asker.console_url, "tiny").get("hosts") == [bad.node_id], 60, what="bad hosting")
    for proc in (asker, bad):  # through a tunnel, and bad's own gateway with its own llama-server

        def cut_reported(proc: NodeProcess = proc) -> openai.APIError | None:
            try:
                text = stream(proc)
            except openai.APIStatusError as exc:
                if exc.status_code == 503:  # bad's llama-server is starting again after its crash
                    return None
                raise
            except openai.APIError as exc:
                return exc  # raised mid-stream, by the library, from the gateway's error event
            raise AssertionError(f"a cut answer ended normally: {text!r}")

        error = wait_until(cut_reported, 60, what=f"{proc.config.stem} to report the cut")
        assert "host serving this answer was lost" in str(error)
        assert proc.events("gateway.host_lost_mid_response")
