"""Test helpers: polling with deadlines, log capture, in-process nodes and node processes.

Every process a test starts is ended by its process group at teardown, even when the test fails.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from meshllm.cli import config_invite
from meshllm.config import (
    ApiSection,
    ConsoleSection,
    HostPort,
    ModelsSection,
    NodeConfig,
    NodeSection,
    TimingSection,
    load_config,
)
from meshllm.node import Node
from meshllm.wire.grants import DEFAULT_TTL_S

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll until ``predicate()`` is truthy (returns it) or fail after ``timeout`` seconds.

    Errors from the predicate count as "not yet" (transient while nodes start), except a failed
    check (``AssertionError``, e.g. a node process that exited): that fails at once."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        threading.Event().wait(interval)


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """:func:`wait_until` for a test's own event loop: poll without blocking it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def read_until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
) -> bytes:
    """Everything the other side sends until it closes (a reset or a TLS error ends it too), within
    ``timeout``; the connection is closed after."""
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(4096):
                got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
    return got


def exit_cleanly_on_sigterm() -> None:
    """For a benchmark's main(): SIGTERM (``kill PID``) raises SystemExit, so the ``finally`` blocks
    that stop its nodes run, instead of the nodes outliving it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def fed_reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    """A StreamReader holding ``data`` (and its end, unless ``eof`` is false)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


class LogCapture(io.TextIOBase):
    """A text stream that keeps JSON log lines and lets a test wait for an event."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def write(self, s: str) -> int:
        for line in s.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            record["_t"] = time.monotonic()
            with self._cond:
                self.records.append(record)
                self._cond.notify_all()
        return len(s)

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                r
                for r in self.records
                if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
            ]

    def wait_for(self, event: str, timeout: float, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.records:
                    if r.get("event") == event and all(r.get(k) == v for k, v in fields.items()):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log event {event} {fields} within {timeout}s")
                self._cond.wait(left)


def node_config(tmp: Path, name: str, join: tuple[str, ...] = (), **node: Any) -> NodeConfig:
    """A loopback node config on free ports with its own data dir under ``tmp``."""
    timing = node.pop("timing", TimingSection())
    host_wait_s = node.pop("host_wait_s", ApiSection.host_wait_s)
    models = ModelsSection(serve=tuple(node.pop("serve", ())), force_split=node.pop("force_split", False))
    return NodeConfig(
        node=NodeSection(
            name=name, data_dir=tmp / name, quic_listen=HostPort("127.0.0.1", 0), join=tuple(join), **node
        ),
        console=ConsoleSection(listen=HostPort("127.0.0.1", 0)),
        api=ApiSection(listen=HostPort("127.0.0.1", 0), host_wait_s=host_wait_s),
        models=models,
        timing=timing,
    )


class NodeFactory:
    """Starts in-process nodes and stops every one of them at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nodes: list[Node] = []
        self.logs: dict[str, LogCapture] = {}

    def start(self, name: str, join: tuple[str, ...] = (), **node: Any) -> Node:
        capture = LogCapture()
        self.logs[name] = capture
        n = Node(node_config(self.tmp, name, join, **node), log_stream=capture).start()
        self.nodes.append(n)
        return n

    def close(self) -> None:
        for n in reversed(self.nodes):
            try:
                n.stop(leave=False)
            except Exception:
                pass


def write_config(
    tmp: Path, name: str, join: tuple[str, ...] = (), extra: str = "", node_extra: str = ""
) -> Path:
    """A node.toml for a CLI process on loopback with free ports."""
    path = tmp / f"{name}.toml"
    join_list = ", ".join(json.dumps(t) for t in join)
    path.write_text(
        f"""
[node]
name = "{name}"
data_dir = "{tmp / name}"
quic_listen = "127.0.0.1:0"
join = [{join_list}]
{node_extra}

[api]
listen = "127.0.0.1:0"

[console]
listen = "127.0.0.1:0"
{extra}
"""
    )
    return path


class NodeProcess:
    """``meshllm run --config FILE`` in its own process group, its JSON log in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.command_prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS): tests/netns.py

    def start(self) -> NodeProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command_prefix, sys.executable, "-m", "meshllm", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        return self

    def records(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        ]

    def wait_event(self, event: str, timeout: float, since: int = 0, **fields: Any) -> dict[str, Any]:
        """Wait for the first matching event after the ``since``-th record."""

        def found() -> dict[str, Any] | None:
            for r in self.records()[since:]:
                if r.get("event") == event and all(r.get(k) == v for k, v in fields.items()):
                    return r
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) before {event}:\n{self.tail()}")
            return None

        try:
            return wait_until(found, timeout, interval=0.05, what=f"{event} {fields}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- log tail ---\n{self.tail()}") from None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return ""

    @property
    def started(self) -> dict[str, Any]:
        return self.wait_event("node.started", 30)

    @property
    def token(self) -> str:
        """An active token (joining nodes become members); :meth:`token_for` for other roles."""
        return self.token_for("active")

    def token_for(self, role: str, ttl_s: int = DEFAULT_TTL_S) -> str:
        """A token as ``meshllm invite --config`` prints it, once the node has started (the node's
        log never carries one)."""
        self.wait_event("node.started", 30)
        return config_invite(load_config(self.config), role, ttl_s)

    @property
    def node_id(self) -> str:
        return str(self.started["node_id"])

    @property
    def console_url(self) -> str:
        return str(self.started["console"])

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()


class ProcessFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[NodeProcess] = []

    def start(
        self,
        name: str,
        join: tuple[str, ...] = (),
        extra: str = "",
        node_extra: str = "",
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        """Start a node process; a name started before reuses its config (same data dir, same id)."""
        config = self.tmp / f"{name}.toml"
        if not config.exists():
            write_config(self.tmp, name, join, extra, node_extra)
        runs = sum(1 for q in self.procs if q.config == config)
        p = NodeProcess(config, self.tmp / f"{name}.{runs}.log", env).start()
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            try:
                p.signal(signal.SIGKILL)
                if p.proc is not None:
                    p.proc.wait(10)
            except Exception:
                pass


def iter_json(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def console_status(console_url: str) -> dict[str, Any]:
    """A node's ``/api/status`` (``node.console_url`` of a Node or a NodeProcess)."""
    with urllib.request.urlopen(console_url + "/api/status", timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def model_status(console_url: str, name: str) -> dict[str, Any]:
    """One model's entry in a node's status; empty when the node does not know it (yet)."""
    return next((m for m in console_status(console_url)["models"] if m["name"] == name), {})
