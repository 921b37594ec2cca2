"""The Election actor alone: fed topology events, Supervisor reports and transport answers as msgpack
messages, with dummy "registry", "supervisor", "router" and "transport" actors recording what it tells
them. No llama.cpp process runs: the election only ever says which ones should.

Models are fake ModelRefs (a small file, any size the test likes). The first test lets the actor's own
debounce timer drive the re-plan; the others move a fake clock past the debounce and send the tick
themselves, so "nothing was sent" is checked after a re-plan that surely happened.
"""

from __future__ import annotations

import errno
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import actors.election as election_module
from actors.election import REPLAN_DEBOUNCE_S, SUSPECT_S, Election
from meshllm.models.catalog import ModelRef
from meshllm.models.devices import GpuMemory
from meshllm.placement import needed_bytes
from meshllm.serving.process_specs import rpc_spec, server_spec, split_server_spec
from meshllm.serving.rpc_cache import cache_dir_env
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    AllowRpcHost,
    DesiredProcesses,
    EnsureRpcListeners,
    GetPlan,
    LlamaFailed,
    LlamaReady,
    LlamaStopped,
    LocalServing,
    ModelDescribed,
    ModelStatus,
    PeerAnnouncement,
    PeerDied,
    PeerJoined,
    PeerLeft,
    PeerUpdated,
    PlanReply,
    ProcessSpec,
    RpcListeners,
    RpcTunnelFailed,
    Seed,
    SetLocalAnnouncement,
    Subscribe,
    Tick,
)
from tests.actor_dummies import FakeClock, Harness, wait_until

NEIGHBOURS = ("registry", "supervisor", "router", "transport")
STEP = REPLAN_DEBOUNCE_S * 2
"""How far the fake clock moves for one re-plan: past the debounce."""


def fake_model(tmp_path: Path, name: str, size: int) -> ModelRef:
    """A model of any size the test likes: the file only has to exist (and is no real GGUF)."""
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(b"not really a GGUF")
    return ModelRef(name=name, path=path, size_bytes=size)


def peer(node_id: str, vram: int, models: tuple[str, ...] = ("big",), **fields: Any) -> PeerAnnouncement:
    base = PeerAnnouncement(
        node_id=node_id, name=f"n-{node_id}", role="active", addrs=(f"{node_id}.test:1",), vram_bytes=vram
    )
    return replace(base, models=models, **fields)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock().install(monkeypatch, election_module)


def start(
    h: Harness,
    vram: int,
    *models: ModelRef,
    clock: FakeClock | None = None,
    force_split: bool = False,
    cache_dir: Path | None = None,
    threads: int | None = None,
    pending: tuple[str, ...] = (),
    gpus: tuple[GpuMemory, ...] = (),
) -> None:
    """Start the election; with a fake clock, also let it make its first plan (with no peers known
    yet, as a node's election does when it starts), so every later plan follows a told change."""
    for name in NEIGHBOURS:
        h.dummy(name)
    Election.start(
        h.directory,
        h.logger,
        own_id="me",
        vram_bytes=vram,
        models=models,
        force_split=force_split,
        cache_dir=cache_dir,
        threads=threads,
        pending=pending,
        gpus=gpus,
    )
    if clock is not None:
        replan(h, clock)


def say(h: Harness, *msgs: Message) -> None:
    """Tell the election these messages and wait until they are handled (at the fake clock's time)."""
    for msg in msgs:
        h.tell("election", msg)
    h.settle("election", GetPlan())


def replan(h: Harness, clock: FakeClock) -> None:
    """Let the debounce pass and tick: the election re-plans now if anything changed."""
    clock.advance(STEP)
    say(h, Tick("replan"))


def desired(h: Harness) -> list[tuple[ProcessSpec, ...]]:
    return [m.specs for m in h.inboxes["supervisor"].messages(DesiredProcesses)]


def listeners(h: Harness) -> list[EnsureRpcListeners]:
    return h.inboxes["transport"].messages(EnsureRpcListeners)


def plan(h: Harness, model: str) -> ModelStatus:
    reply = h.ask("election", GetPlan(), PlanReply)
    return next(m for m in reply.models if m.name == model)


def announced(h: Harness) -> SetLocalAnnouncement:
    return h.inboxes["registry"].last(SetLocalAnnouncement)


def local_serving(h: Harness, since: int = 0) -> list[LocalServing]:
    return h.inboxes["router"].messages(LocalServing, since=since)


# -- solo -----------------------------------------------------------------------------------------------------


def test_a_model_that_fits_is_served_solo(h: Harness, tmp_path: Path) -> None:
    small = fake_model(tmp_path, "small", 1000)
    start(h, 2000, small, threads=2)
    supervisor, router, registry = (h.inboxes[n] for n in ("supervisor", "router", "registry"))
    assert registry.wait_for(Subscribe) == Subscribe(subscriber="election")

    # Its own debounce timer makes the first plan.
    [spec] = supervisor.wait_for(DesiredProcesses).specs
    assert spec == server_spec(small, 2)
    assert (spec.key, spec.kind, spec.model_path) == ("server:small", "llama-server", str(small.path))
    assert "--rpc" not in spec.args
    assert router.wait_for(LocalServing) == LocalServing(model="small", port=0)  # not routed to yet
    assert plan(h, "small").state == "starting"

    h.tell("election", LlamaReady(key="server:small", kind="llama-server", port=8081, pid=4242))
    assert router.wait_for(LocalServing, lambda m: m.port == 8081) == LocalServing(model="small", port=8081)
    serving = registry.wait_for(SetLocalAnnouncement, lambda m: m.serving == ("small",))
    assert serving == SetLocalAnnouncement(
        models=("small",),
        serving=("small",),
        vram_bytes=2000,
        rpc_ready=(),
        model_bytes={"small": 1000},
        model_context={"small": 4096},  # llama.py's default -c: what /v1/models says
    )
    assert plan(h, "small") == ModelStatus(
        name="small",
        state="solo",
        hosts=("me",),
        host="me",
        size_bytes=1000,
        needed_bytes=needed_bytes(1000),
        available_bytes=2000,
    )


def test_an_unchanged_plan_is_not_sent_again(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    small, big = fake_model(tmp_path, "small", 1000), fake_model(tmp_path, "big", 5000)
    start(h, 4000, small, big, clock=clock)
    assert desired(h) == [(server_spec(small, None),)]

    # Changes that leave this node's processes as they are: a peer with another model, news that does
    # not matter to planning, the Supervisor's reports.
    other = peer("p", 100_000, models=("other",))
    say(h, PeerJoined(peer=other))
    replan(h, clock)
    say(
        h,
        PeerUpdated(peer=replace(other, serving=("other",), version=1)),
        LlamaReady(key="server:small", kind="llama-server", port=8081, pid=1),
    )
    replan(h, clock)
    say(h, PeerJoined(peer=peer("q", 100, models=("big",))))  # not enough to split big with
    replan(h, clock)
    replan(h, clock)
    assert desired(h) == [(server_spec(small, None),)]
    assert plan(h, "other") == ModelStatus(name="other", state="serving", hosts=("p",))

    # A change that matters: with r there is enough VRAM for big, r hosts it and this node lends its share
    # (which fits next to small).
    say(h, PeerJoined(peer=peer("r", 5000, models=("big",))))
    replan(h, clock)
    assert desired(h)[1:] == [(server_spec(small, None), rpc_spec("big", None))]
    assert plan(h, "small").state == "solo"
    assert plan(h, "big").state == "starting"


def test_too_big_without_peers_waits_and_says_for_what(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    big = fake_model(tmp_path, "big", 8000)
    start(h, 4000, big, clock=clock)
    assert desired(h) == [()]  # nothing to run
    assert plan(h, "big") == ModelStatus(
        name="big",
        state="waiting",
        hosts=(),
        size_bytes=8000,
        needed_bytes=needed_bytes(8000),
        available_bytes=4000,
        detail=f"needs {needed_bytes(8000)} bytes of VRAM, the group has 4000",
    )
    [waiting] = h.log.events("election.waiting")
    assert (waiting["model"], waiting["needed_bytes"], waiting["available_bytes"]) == ("big", 8800, 4000)

    # A passive node's memory does not count; an active peer's does, even when still not enough.
    say(h, PeerJoined(peer=peer("client", 100_000, role="client")), PeerJoined(peer=peer("p", 2000)))
    replan(h, clock)
    assert plan(h, "big").available_bytes == 6000
    assert plan(h, "big").state == "waiting"
    assert desired(h) == [()]


def test_a_forced_split_with_nobody_to_split_with_runs_solo(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    small = fake_model(tmp_path, "small", 1000)
    start(h, 6000, small, force_split=True, clock=clock)
    assert desired(h) == [(server_spec(small, None),)]
    assert plan(h, "small").detail == "split forced but no other node serves this model"

    say(h, PeerJoined(peer=peer("p", 4000, models=("small",))))
    replan(h, clock)
    assert desired(h)[1:] == [(rpc_spec("small", None),)]  # split, this node hosting: its share first
    status = plan(h, "small")
    assert (status.host, status.workers, status.fractions) == ("me", ("p",), (0.6, 0.4))


def test_a_peer_asking_for_a_split_gets_one(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    small = fake_model(tmp_path, "small", 1000)
    start(h, 4000, small, clock=clock)
    assert desired(h) == [(server_spec(small, None),)]  # it fits
    say(h, PeerJoined(peer=peer("p", 6000, models=("small",), force_split=True)))
    replan(h, clock)
    assert desired(h)[1:] == [(rpc_spec("small", None),)]
    status = plan(h, "small")
    assert (status.state, status.host, status.workers) == ("starting", "p", ("me",))


# -- split: this node a worker ------------------------------------------------------------------------------


def test_a_split_worker_runs_an_rpc_server_and_announces_it(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    big = fake_model(tmp_path, "big", 8000)
    start(h, 4000, big, clock=clock)
    assert desired(h) == [()]  # waiting for VRAM
    say(h, PeerJoined(peer=peer("p", 6000)))
    replan(h, clock)
    assert desired(h)[1:] == [(rpc_spec("big", None),)]
    assert local_serving(h) == [LocalServing(model="big", port=0, kind="rpc-server")]
    status = plan(h, "big")
    assert (status.state, status.host, status.workers, status.fractions) == (
        "starting",
        "p",
        ("me",),
        (0.6, 0.4),
    )

    say(h, LlamaReady(key="rpc:big", kind="rpc-server", port=5001, pid=7))
    assert local_serving(h)[-1] == LocalServing(model="big", port=5001, kind="rpc-server")
    assert announced(h) == SetLocalAnnouncement(
        models=("big",),
        serving=(),
        vram_bytes=4000,
        rpc_ready=("big",),
        model_bytes={"big": 8000},
        model_context={"big": 4096},
    )
    assert plan(h, "big").state == "worker"
    # Only p, the plan's host, may open tunnels to the rpc-server: told before it started.
    assert h.inboxes["transport"].messages(AllowRpcHost) == [AllowRpcHost(model="big", host="p")]
    replan(h, clock)
    assert listeners(h) == []  # the host opens the tunnels, not a worker
    assert len(desired(h)) == 2

    say(h, PeerDied(node_id="p", incarnation=0, reason="silent"))  # the group is gone
    replan(h, clock)
    assert desired(h)[2:] == [()]
    assert local_serving(h)[-1] == LocalServing(model="big", port=0, kind="rpc-server")
    assert announced(h).rpc_ready == ()
    assert plan(h, "big").state == "waiting"
    assert h.inboxes["transport"].last(AllowRpcHost) == AllowRpcHost(model="big", host="")


@pytest.mark.parametrize("cached", [False, True], ids=["threads", "tensor-cache"])
def test_a_split_workers_rpc_server_has_the_nodes_threads_and_its_tensor_cache(
    h: Harness, clock: FakeClock, tmp_path: Path, cached: bool
) -> None:
    """A worker's rpc-server is the one the remote host sends tensors to: it gets the node's thread
    setting and, with a cache dir, the tensor cache filled from its own GGUF (-c)."""
    big = fake_model(tmp_path, "big", 8000)
    cache = tmp_path / "cache" if cached else None
    start(h, 4000, big, cache_dir=cache, threads=3, clock=clock)
    say(h, PeerJoined(peer=peer("p", 6000)))
    expected = rpc_spec("big", 3, cache)

    def rpc_wanted() -> bool:
        replan(h, clock)
        return any(s.kind == "rpc-server" for specs in desired(h) for s in specs)

    wait_until(rpc_wanted, what="a DesiredProcesses with the worker's rpc-server")
    assert desired(h)[-1] == (expected,)


# -- split: this node the host ---------------------------------------------------------------------------------


def host_with_worker_ready(h: Harness, clock: FakeClock, tmp_path: Path) -> ModelRef:
    """This node (6000) hosts big (8000) with p (4000); both rpc-servers are up; listeners asked."""
    big = fake_model(tmp_path, "big", 8000)
    start(h, 6000, big, clock=clock)
    p = peer("p", 4000)
    say(h, PeerJoined(peer=p))
    replan(h, clock)
    say(h, LlamaReady(key="rpc:big", kind="rpc-server", port=5001, pid=7))
    say(h, PeerUpdated(peer=replace(p, rpc_ready=("big",), version=1)))
    replan(h, clock)
    assert listeners(h) == [EnsureRpcListeners(model="big", workers=(Seed("p", ("p.test:1",)),))]
    return big


def test_a_split_host_opens_tunnels_once_every_rpc_server_is_up(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    big = fake_model(tmp_path, "big", 8000)
    start(h, 6000, big, clock=clock)
    p = peer("p", 4000)
    say(h, PeerJoined(peer=p))
    replan(h, clock)
    assert desired(h) == [(), (rpc_spec("big", None),)]  # waiting for VRAM, then its own share first
    assert plan(h, "big").detail == "waiting for rpc-servers: this node, p"

    say(h, LlamaReady(key="rpc:big", kind="rpc-server", port=5001, pid=7))
    replan(h, clock)
    assert plan(h, "big").detail == "waiting for rpc-servers: p"
    assert listeners(h) == [] and len(desired(h)) == 2

    say(h, PeerUpdated(peer=replace(p, rpc_ready=("big",), version=1)))  # the worker's is up too
    replan(h, clock)
    assert listeners(h) == [EnsureRpcListeners(model="big", workers=(Seed("p", ("p.test:1",)),))]
    assert len(desired(h)) == 2  # no llama-server before the listeners exist
    say(h, PeerJoined(peer=peer("x", 10, models=("other",))))  # something to re-plan for
    replan(h, clock)
    assert len(listeners(h)) == 1  # asked once, not on every re-plan

    mark = h.inboxes["router"].mark()
    say(h, RpcListeners(model="big", ports={"p": 6001}))
    replan(h, clock)
    server = split_server_spec(big, None, [5001, 6001], (0.6, 0.4))
    assert desired(h)[2:] == [(rpc_spec("big", None), server)]
    args = server.args
    assert args[args.index("--rpc") + 1] == "127.0.0.1:5001,127.0.0.1:6001"  # own rpc-server first
    assert args[args.index("--tensor-split") + 1] == "0.6,0.4"
    assert local_serving(h, mark) == [LocalServing(model="big", port=0)]

    say(h, LlamaReady(key="server:big", kind="llama-server", port=8081, pid=8))
    assert local_serving(h)[-1] == LocalServing(model="big", port=8081)
    assert announced(h) == SetLocalAnnouncement(
        models=("big",),
        serving=("big",),
        vram_bytes=6000,
        rpc_ready=("big",),
        model_bytes={"big": 8000},
        model_context={"big": 4096},
    )
    status = plan(h, "big")
    assert (status.state, status.hosts, status.host, status.workers, status.fractions) == (
        "split",
        ("me",),
        "me",
        ("p",),
        (0.6, 0.4),
    )
    replan(h, clock)
    assert len(desired(h)) == 3 and len(listeners(h)) == 1


def test_failed_listeners_are_asked_for_again(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    host_with_worker_ready(h, clock, tmp_path)
    say(h, RpcListeners(model="big", ports={}, error="address in use"))
    assert [e["reason"] for e in h.log.events("rpc.listeners_failed")] == ["address in use"]
    replan(h, clock)
    assert len(listeners(h)) == 2 and listeners(h)[1] == listeners(h)[0]
    assert len(desired(h)) == 2

    say(h, RpcListeners(model="big", ports={"p": 6001}))
    replan(h, clock)
    assert [s.key for s in desired(h)[-1]] == ["rpc:big", "server:big"]


def test_answers_to_other_requests_are_ignored(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    host_with_worker_ready(h, clock, tmp_path)
    say(
        h,
        RpcListeners(model="big", ports={"someone-else": 6009}),  # an older request's answer
        RpcListeners(model="unknown", ports={"p": 6001}),
    )
    replan(h, clock)
    assert len(desired(h)) == 2 and len(listeners(h)) == 1


def test_a_worker_whose_tunnel_failed_is_left_out_for_a_while(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    big = fake_model(tmp_path, "big", 8000)
    start(h, 6000, big, clock=clock)
    p1 = peer("p1", 4000, rpc_ready=("big",))
    p2 = peer("p2", 4000, rpc_ready=("big",))
    say(h, PeerJoined(peer=p1), PeerJoined(peer=p2))
    replan(h, clock)
    assert listeners(h) == []  # the workers are ready, its own rpc-server is not
    assert plan(h, "big").detail == "waiting for rpc-servers: this node"
    say(h, LlamaReady(key="rpc:big", kind="rpc-server", port=5001, pid=7))
    replan(h, clock)
    assert listeners(h)[-1].workers == (Seed("p1", ("p1.test:1",)),)  # equal VRAM: the lower node id
    say(h, RpcListeners(model="big", ports={"p1": 6001}))
    replan(h, clock)
    assert desired(h)[-1] == (rpc_spec("big", None), split_server_spec(big, None, [5001, 6001], (0.6, 0.4)))

    failed_at = clock.monotonic()
    tunnel_failed = RpcTunnelFailed(model="big", worker="p1", reason="connection refused")
    say(h, tunnel_failed, tunnel_failed)
    assert len(h.log.events("election.worker_unreachable", worker="p1")) == 1
    replan(h, clock)
    assert listeners(h)[-1].workers == (Seed("p2", ("p2.test:1",)),)  # p2 takes its place
    assert desired(h)[-1] == (rpc_spec("big", None),)  # the old llama-server goes while tunnels open
    assert plan(h, "big").workers == ("p2",)
    say(h, RpcListeners(model="big", ports={"p2": 6002}))
    replan(h, clock)
    assert desired(h)[-1] == (rpc_spec("big", None), split_server_spec(big, None, [5001, 6002], (0.6, 0.4)))

    clock.advance(failed_at + SUSPECT_S - 0.25 - clock.monotonic())
    say(h, Tick("replan"))  # still within SUSPECT_S of the failure ...
    replan(h, clock)
    assert plan(h, "big").workers == ("p2",)
    clock.advance(failed_at + SUSPECT_S - clock.monotonic())
    say(h, Tick("replan"))  # ... and now past it: p1 is a candidate again
    replan(h, clock)
    assert plan(h, "big").workers == ("p1",)
    assert listeners(h)[-1].workers == (Seed("p1", ("p1.test:1",)),)


def test_a_worker_leaving_closes_the_listeners(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    host_with_worker_ready(h, clock, tmp_path)
    say(h, RpcListeners(model="big", ports={"p": 6001}))
    replan(h, clock)
    say(h, PeerLeft(node_id="p", incarnation=0))
    replan(h, clock)
    assert listeners(h)[-1] == EnsureRpcListeners(model="big", workers=())
    assert desired(h)[-1] == ()
    assert plan(h, "big").state == "waiting"
    assert {(m.port, m.kind) for m in local_serving(h)[-2:]} == {(0, "llama-server"), (0, "rpc-server")}


def test_a_split_hosts_own_rpc_server_has_no_tensor_cache(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    """The host's share crosses only loopback: no fill, no -c, even with a cache dir."""
    big = fake_model(tmp_path, "big", 8000)
    start(h, 6000, big, cache_dir=tmp_path / "cache", threads=2, clock=clock)
    say(h, PeerJoined(peer=peer("p", 4000)))
    replan(h, clock)
    assert plan(h, "big").host == "me"
    assert desired(h)[-1] == (rpc_spec("big", 2),)
    assert not (tmp_path / "cache").exists()


def test_a_worker_without_the_file_runs_a_bare_rpc_server(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    """Workers never download: a hub model not on disk here means nothing to fill the cache from."""
    big = ModelRef(name="big", path=tmp_path / "not-here.gguf", size_bytes=0)
    start(h, 4000, big, cache_dir=tmp_path / "cache", threads=2, clock=clock, pending=("big",))
    say(h, ModelDescribed(model="big", size_bytes=8000, kv_bytes=0), PeerJoined(peer=peer("p", 6000)))
    replan(h, clock)
    assert plan(h, "big").host == "p"
    assert desired(h)[-1] == (rpc_spec("big", 2),)


def test_the_cache_fill_comes_before_a_workers_rpc_server(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    # The model is a named pipe: the fill (on its own thread) blocks reading it until the test writes.
    fifo = tmp_path / "big.gguf"
    os.mkfifo(fifo)
    big = ModelRef(name="big", path=fifo, size_bytes=8000)
    cache = tmp_path / "cache"
    start(h, 4000, big, cache_dir=cache, clock=clock)
    say(h, PeerJoined(peer=peer("p", 6000)))
    try:
        replan(h, clock)  # a split worker now: the fill starts
        replan(h, clock)
        assert plan(h, "big").host == "p"
        assert desired(h) == [()]  # no rpc-server while the cache is being filled
    finally:
        writer = wait_until(lambda: open_writer(fifo), what="the cache fill to open the model")
        assert writer is not None
        os.close(writer)

    def rpc_wanted() -> tuple[ProcessSpec, ...] | None:
        replan(h, clock)
        return next((specs for specs in desired(h) if specs), None)

    specs = wait_until(rpc_wanted, what="the rpc-server after the cache fill")
    # The "model" was empty: the fill failed, and the rpc-server still starts, with a cold cache.
    assert specs == (rpc_spec("big", None, cache),)
    assert specs[0].args == ("-c",) and specs[0].env == cache_dir_env(cache)
    assert [e["model"] for e in h.log.events("rpc.cache_fill_failed")] == ["big"]


def open_writer(fifo: Path) -> int | None:
    """The write end of ``fifo`` once a reader has it open (closing it ends the reader's read)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
            raise
        return None


# -- the Supervisor's reports -----------------------------------------------------------------------------------


def test_supervisor_reports_become_state_ports_and_announcements(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    small = fake_model(tmp_path, "small", 1000)
    start(h, 2000, small, clock=clock)
    replan(h, clock)
    say(h, LlamaReady(key="server:small", kind="llama-server", port=8081, pid=1))
    assert plan(h, "small").state == "solo"

    mark = h.inboxes["router"].mark()
    say(h, LlamaFailed(key="server:small", kind="llama-server", reason="exit 1", log_tail="", retry_in_s=2.0))
    assert plan(h, "small").state == "starting" and plan(h, "small").detail == "exit 1"
    assert local_serving(h, mark) == [LocalServing(model="small", port=0)]
    assert announced(h).serving == ()
    assert announced(h).model_bytes == {"small": 1000}, "peers learn the size of its models"

    say(h, LlamaFailed(key="server:small", kind="llama-server", reason="gave up", log_tail="", retry_in_s=-1))
    assert plan(h, "small").state == "failed"
    say(h, LlamaReady(key="server:small", kind="llama-server", port=8082, pid=2))
    assert announced(h).serving == ("small",)
    say(h, LlamaStopped(key="server:small", kind="llama-server"))
    assert local_serving(h)[-1] == LocalServing(model="small", port=0)
    assert announced(h).serving == ()

    mark = h.inboxes["registry"].mark()
    say(h, LlamaReady(key="server:unknown", kind="llama-server", port=9, pid=3))  # not a model of ours
    assert h.inboxes["registry"].mark() == mark


# -- GPUs -----------------------------------------------------------------------------------------------------

H200 = GpuMemory(0, "GPU-h200", "NVIDIA H200", 6000, 5000, "CUDA0")


def test_a_gpu_node_offloads_a_solo_model(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    small = fake_model(tmp_path, "small", 1000)
    start(h, 6000, small, clock=clock, gpus=(H200,))
    (spec,) = desired(h)[-1]
    assert spec == server_spec(small, None, gpu=True)
    assert spec.args[-2:] == ("-ngl", "999")


def test_a_gpu_worker_exposes_its_gpus_in_its_rpc_server(
    h: Harness, clock: FakeClock, tmp_path: Path
) -> None:
    big = fake_model(tmp_path, "big", 8000)
    start(h, 4000, big, clock=clock, gpus=(H200, replace(H200, index=1, uuid="GPU-2", device="CUDA1")))
    say(h, PeerJoined(peer=peer("a", 6000)))  # bigger: the host
    replan(h, clock)
    assert plan(h, "big").workers == ("me",)
    (spec,) = desired(h)[-1]
    assert spec == rpc_spec("big", None, devices=("CUDA0", "CUDA1"))
    assert spec.args[:2] == ("-d", "CUDA0,CUDA1")


def test_a_gpu_split_host_keeps_its_share_on_its_gpus(h: Harness, clock: FakeClock, tmp_path: Path) -> None:
    """No rpc-server of its own; the worker's RPC device comes first in llama.cpp's model order, the
    host's GPU last, and the output matrix is no longer pinned to the CPU."""
    big = fake_model(tmp_path, "big", 8000)
    start(h, 6000, big, clock=clock, gpus=(H200,))
    p = peer("p", 4000, rpc_ready=("big",))
    say(h, PeerJoined(peer=p))
    replan(h, clock)
    assert desired(h)[-1] == ()  # nothing to start before the tunnel listener: no own rpc-server
    assert listeners(h) == [EnsureRpcListeners(model="big", workers=(Seed("p", ("p.test:1",)),))]
    say(h, RpcListeners(model="big", ports={"p": 6001}))
    replan(h, clock)
    (server,) = desired(h)[-1]
    assert server == split_server_spec(big, None, [6001], (0.4, 0.6), gpu_host=True)
    args = server.args
    assert args[args.index("--rpc") + 1] == "127.0.0.1:6001"
    assert args[args.index("--tensor-split") + 1] == "0.4,0.6"  # worker (RPC0) first, CUDA0 last
    assert "-ot" not in args and args[-2:] == ("-ngl", "999")
