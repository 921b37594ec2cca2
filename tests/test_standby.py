"""Standby promotion with real node processes and llama.cpp: a standby takes over a model whose last
host died or left, clients follow, one standby takes each gap, a standby that cannot fit stays out,
and the original host coming back does not make anything flap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from meshllm.models.gguf_shape import shape_of_file
from tests.fake_hub import FakeHub
from tests.fake_hub import fake_hub as fake_hub_fixture  # noqa: F401
from tests.support import NodeProcess, ProcessFactory, console_status, model_status, wait_until

pytestmark = pytest.mark.llama


def serve(model: Path) -> str:
    return f'[models]\nserve = ["{model}"]\n'


def standby(model: Path, window_s: float = 1.0, demote_after_s: float = 300.0) -> str:
    return serve(model) + f"[standby]\npromote_window_s = {window_s}\ndemote_after_s = {demote_after_s}\n"


def ask(proc: NodeProcess, model: str = "tiny") -> str:
    c = openai.OpenAI(base_url=str(proc.started["api"]), api_key="unused", max_retries=0, timeout=30)
    return c.completions.create(model=model, prompt="Once", max_tokens=4, temperature=0).choices[0].text


def answers(proc: NodeProcess) -> str | None:
    try:
        return ask(proc)
    except openai.APIError:
        return None


def hosts(proc: NodeProcess, model: str = "tiny") -> list[str]:
    return list(model_status(proc.console_url, model).get("hosts", []))


def mesh(
    procs: ProcessFactory, tiny_gguf: Path, standbys: int = 1, **standby_cfg: Any
) -> tuple[NodeProcess, ...]:
    """a serves tiny, c serves nothing, the standbys can serve tiny, b is a client of a and c."""
    a = procs.start("a", extra=serve(tiny_gguf))
    c = procs.start("c", join=(a.token,))
    s = [
        procs.start(
            f"s{i}",
            join=(a.token_for("standby"), c.token_for("standby")),
            extra=standby(tiny_gguf, **standby_cfg),
            node_extra='role = "standby"',
        )
        for i in range(standbys)
    ]
    b = procs.start("b", join=(a.token_for("client"), c.token_for("client")), node_extra='role = "client"')
    a.wait_event("llama.ready", 60)
    wait_until(lambda: answers(b), 30, what="b to answer through a")
    # A standby takes over only a model it has seen served: the test may stop a only after that.
    for standby_node in s:
        wait_until(
            lambda node=standby_node: hosts(node) == [a.node_id],
            30,
            what=f"{standby_node.config.stem} to see a serve tiny",
        )
    return (a, c, b, *s)


def test_standby_takes_over_when_the_last_host_is_killed(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a, c, b, s = mesh(procs, tiny_gguf)
    before = ask(b)
    a.kill9()
    s.wait_event("standby.promoting", 30, model="tiny", reason="death")
    s.wait_event("standby.promoted", 60, model="tiny")
    assert wait_until(lambda: answers(b), 30, what="b to answer again") == before
    assert hosts(c) == [s.node_id]
    status = console_status(c.console_url)
    assert status["standby_connections"] == 0  # s is an active member now
    # The consoles' timelines show the promotion: c saw s join as a promoted standby, s promoted itself.
    assert any(e["kind"] == "promoted" and e.get("node_id") == s.node_id for e in status["timeline"])
    assert "promoted" in [e["kind"] for e in console_status(s.console_url)["timeline"]]


def test_standby_takes_over_when_the_last_host_leaves(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a, _c, b, s = mesh(procs, tiny_gguf)
    a.stop()  # SIGTERM: a tells everyone it is leaving
    # Its leaving notice names the reason; on a loaded machine the standby's first route request to a
    # may have timed out, leaving no connection for the notice: then the table shows a gone ("gap").
    assert s.wait_event("standby.promoting", 40, model="tiny")["reason"] in ("leave", "gap")
    s.wait_event("standby.promoted", 60, model="tiny")
    assert wait_until(lambda: answers(b), 30, what="b to answer again")


def test_of_two_standbys_one_promotes(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a, c, b, s0, s1 = mesh(procs, tiny_gguf, standbys=2, window_s=2.0)
    a.kill9()
    wait_until(lambda: answers(b), 60, what="b to answer again")
    promoted = [s for s in (s0, s1) if s.events("standby.promoting")]
    assert len(promoted) == 1, [s.events("standby.promoting") for s in (s0, s1)]
    assert hosts(c) == [promoted[0].node_id]


def test_a_standby_that_cannot_fit_the_model_stays_out(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a = procs.start("a", extra=serve(tiny_gguf))
    c = procs.start("c", join=(a.token,))
    need = (tiny_gguf.stat().st_size + shape_of_file(tiny_gguf).kv_cache_bytes(4096)) * 1.1
    s = procs.start(
        "s",
        join=(a.token_for("standby"), c.token_for("standby")),
        extra=standby(tiny_gguf),
        node_extra=f'role = "standby"\nvram_gb = {need / 2 / 1024**3:.9f}',
    )
    a.wait_event("llama.ready", 60)
    wait_until(lambda: console_status(c.console_url)["standby_connections"] == 1, 20, what="s to be counted")
    a.kill9()
    cannot = s.wait_event("standby.cannot_fit", 30, model="tiny")
    assert cannot["needed_bytes"] > cannot["available_bytes"]
    assert not s.events("standby.promoting")


def test_the_original_host_coming_back_does_not_flap(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a, c, b, s = mesh(procs, tiny_gguf, demote_after_s=3.0)
    a.kill9()
    s.wait_event("standby.promoted", 60, model="tiny")
    # The model's own host is back: a node that serves it by configuration (a fresh one, since a's
    # port was picked at random and nobody could find it again at the old address).
    a2 = procs.start("a2", join=(c.token,), extra=serve(tiny_gguf))
    a2.wait_event("llama.ready", 60)
    s.wait_event("standby.demoted", 30, model="tiny")
    wait_until(lambda: hosts(c) == [a2.node_id], 30, what="only the original host to serve tiny")
    mark = len(s.records())
    # Stable: within the cycle guard the standby does not take the model again, and a keeps it.
    assert wait_until(lambda: answers(b), 30, what="b to answer after the demotion")
    assert not [r for r in s.records()[mark:] if r.get("event") == "standby.promoting"]
    assert hosts(c) == [a2.node_id]


def test_a_standby_promotes_for_demand(procs: ProcessFactory, tiny_gguf: Path) -> None:
    a = procs.start("a", extra=serve(tiny_gguf))
    c = procs.start("c", join=(a.token,))
    demand = "[standby]\npromote_window_s = 1.0\ndemand_ratio = 1.0\ndemand_min_per_min = 10\n"
    s = procs.start(
        "s",
        join=(a.token_for("standby"), c.token_for("standby")),
        extra=serve(tiny_gguf) + demand + "[timing]\nroute_refresh_s = 2\n",
        node_extra='role = "standby"',
    )
    a.wait_event("llama.ready", 60)
    for _ in range(25):  # 25 requests a minute on one host, 25/3 per node on average
        assert ask(a)
    wait_until(
        lambda: model_status(c.console_url, "tiny").get("demand_per_min", 0) >= 25,
        30,
        what="demand to travel",
    )
    promoting = s.wait_event("standby.promoting", 40, model="tiny")
    assert promoting["reason"] == "demand"
    s.wait_event("standby.promoted", 60, model="tiny")
    wait_until(lambda: sorted(hosts(c)) == sorted([a.node_id, s.node_id]), 30, what="two hosts")


def test_a_standby_fills_a_gap_an_active_node_cannot(procs: ProcessFactory, tiny_gguf: Path) -> None:
    # c wants tiny but has far too little memory for it: the model is wanted and nobody serves it.
    c = procs.start("c", extra=serve(tiny_gguf), node_extra="vram_gb = 0.0001")
    c.wait_event("election.waiting", 30, model="tiny")
    b = procs.start("b", join=(c.token_for("client"),), node_extra='role = "client"')
    s = procs.start("s", join=(c.token_for("standby"),), extra=standby(tiny_gguf), node_extra='role = "standby"')
    assert s.wait_event("standby.promoting", 30, model="tiny")["reason"] == "gap"
    s.wait_event("standby.promoted", 60, model="tiny")
    assert wait_until(lambda: answers(b), 30, what="b to answer through s")
    assert hosts(c) == [s.node_id]


def test_a_standby_takes_a_hub_model_it_has_to_download(
    procs: ProcessFactory, fake_hub: FakeHub, tiny_gguf: Path, tmp_path: Path
) -> None:
    fake_hub.add_file("org/tiny-GGUF", "tiny-F32.gguf", tiny_gguf)

    def hub_model(cache: str) -> str:
        return f'[models]\nserve = ["org/tiny-GGUF:F32"]\ncache_dir = "{tmp_path / cache}"\n'

    a = procs.start("a", extra=hub_model("cache-a"))
    c = procs.start("c", join=(a.token,))
    s = procs.start(
        "s",
        join=(a.token_for("standby"), c.token_for("standby")),
        extra=hub_model("cache-s") + "[standby]\npromote_window_s = 1.0\n",
        node_extra='role = "standby"',
    )
    b = procs.start("b", join=(a.token_for("client"), c.token_for("client")), node_extra='role = "client"')
    a.wait_event("llama.ready", 60)
    wait_until(lambda: answers_model(b, "tiny-F32"), 30, what="b to answer through a")
    assert not list((tmp_path / "cache-s").rglob("*.gguf"))  # the standby has not fetched it
    a.kill9()
    assert s.wait_event("standby.promoting", 30, model="tiny-F32")["reason"] == "death"
    s.wait_event("download.done", 60, model="tiny-F32")
    s.wait_event("standby.promoted", 60, model="tiny-F32")
    assert wait_until(lambda: answers_model(b, "tiny-F32"), 30, what="b to answer through s")


def answers_model(proc: NodeProcess, model: str) -> str | None:
    try:
        return ask(proc, model)
    except openai.APIError:
        return None


def test_a_client_asking_for_a_model_nobody_serves_brings_a_standby(
    procs: ProcessFactory, tiny_gguf: Path
) -> None:
    c = procs.start("c")
    s = procs.start(
        "s",
        join=(c.token_for("standby"),),
        extra=serve(tiny_gguf) + "[standby]\npromote_window_s = 1.0\n[timing]\nroute_refresh_s = 2\n",
        node_extra='role = "standby"',
    )
    b = procs.start("b", join=(c.token_for("client"),), node_extra='role = "client"')
    wait_until(lambda: console_status(c.console_url)["standby_connections"] == 1, 20, what="s to be counted")

    def asked_enough() -> bool:  # every 404 at the client counts as demand at the active node
        answers(b)
        return model_status(c.console_url, "tiny").get("demand_per_min", 0) >= 10 or bool(
            s.events("standby.promoting")
        )

    wait_until(asked_enough, 60, interval=0.3, what="the client's demand to reach c")
    assert s.wait_event("standby.promoting", 30, model="tiny")["reason"] == "demand"
    assert wait_until(lambda: answers(b), 60, what="b to answer through s")
