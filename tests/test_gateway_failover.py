"""A host that fails while answering, as the soak test saw it: before the first byte of the body the
request goes to another host (the client never gets an empty 200); after it, the client's OpenAI
library reports an error, never a normal end. The failing host runs a fake llama-server
(tests/data/fake-llama) that sends its streaming headers and then dies, before or after one event.
A host killed outright is given up within a ping when its TCP port refuses, not after the seconds of
silence a QUIC connection needs to show a dead peer."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import openai
import pytest

from meshllm.net.fast_path import NothingListens
from meshllm.placement import rank_hosts
from tests.support import NodeFactory, NodeProcess, ProcessFactory, model_status, wait_until, write_config
from tests.tunnel_support import tunnel_request

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

        # Its access-log line (written when the answer has ended) says it came whole from good, after
        # two tries.
        def retried_line(proc: NodeProcess = proc, mark: int = mark) -> list[dict[str, object]]:
            return [r for r in proc.records()[mark:] if r.get("event") == "gateway.served" and r.get("tries")]

        served = wait_until(retried_line, 10, what=f"{proc.config.stem}'s gateway.served line")[-1]
        assert served["tries"] == 2 and served["target"] == f"node:{good.node_id[:12]}"
        assert served["end"] == "whole" and served["status"] == 200


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
        wait_until(lambda p=proc: p.events("gateway.served", end="host_lost"), 10, what="the access log")
    wait_until(lambda: bad.events("tunnel.served", end="llama_broke"), 10, what="the host's side of the cut")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_port_that_refuses_is_told_apart_from_other_fast_path_failures(nodes: NodeFactory) -> None:
    endpoint = nodes.start("front").endpoint
    assert endpoint is not None
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()  # accepts, never speaks TLS: a failure, but someone listens

    def open_to(*ports: int) -> BaseException:
        async def run() -> None:
            await endpoint.fast.open("0" * 32, tuple(f"127.0.0.1:{p}" for p in ports), tunnel_request())

        try:
            endpoint.loop_thread.run(asyncio.wait_for(run(), 20), timeout=30)
        except BaseException as exc:
            return exc
        raise AssertionError("connected")

    try:
        assert isinstance(open_to(closed_port(), closed_port()), NothingListens)
        mixed = open_to(closed_port(), mute.getsockname()[1])
        assert isinstance(mixed, ConnectionError) and not isinstance(mixed, NothingListens), mixed
    finally:
        mute.close()


CLIENT = 'role = "client"'


@pytest.mark.parametrize("connected", [True, False], ids=["ping", "handshake"])
def test_a_killed_host_whose_port_refuses_is_given_up_at_once(
    procs: ProcessFactory, tiny_gguf: Path, connected: bool
) -> None:
    """The client's first choice is killed; its next request finds it gone before any death notice
    can come (peers need seconds to call it dead). The TCP refusal, then a missed QUIC ping (1 s) on
    the connection the client holds to its route source, or a missed handshake (2 s) to a host it only
    reached by TCP, say so. Before, the client waited 2 s of silence and a 2 s ping, or a 10 s
    handshake timeout."""
    a = procs.start("a", extra=serve(tiny_gguf))
    b = procs.start("b", join=(a.token,), extra=serve(tiny_gguf))
    both = {a.node_id, b.node_id}
    wait_until(lambda: set(model_status(a.console_url, "tiny").get("hosts", [])) == both, 60, what="both serving")
    asker = procs.start("asker", join=(a.token_for("client"),), node_extra=CLIENT)
    by_id = {a.node_id: a, b.node_id: b}
    first, other = (by_id[n] for n in rank_hosts(asker.node_id, "tiny", list(by_id)))
    source = first if connected else other
    if source is not a:  # rejoin through the host that is to be the route source
        asker.stop()
        write_config(procs.tmp, "asker", (source.token_for("client"),), node_extra=CLIENT)
        asker = procs.start("asker")
    wait_until(lambda: set(model_status(asker.console_url, "tiny").get("hosts", [])) == both, 10, what="routes")
    assert stream(asker)  # through the fast path to its first choice
    first.kill9()
    mark = len(asker.records())
    assert stream(asker), "an empty answer"
    retry = next(r for r in asker.records()[mark:] if r.get("event") == "gateway.retry")
    missed = "did not answer a ping within 1 s" if connected else "completed no QUIC handshake within 2 s"
    assert f"refused TCP and {missed}" in str(retry["reason"]), retry
