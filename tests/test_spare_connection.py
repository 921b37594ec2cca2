"""Spare connections to llama-server: the request after one ends goes on a connection opened before
it, a spare the server closed (or closes as the request goes out) is replaced without an error, one
nobody takes is given up in time, and there is never more than one per port.

The first tests use a loopback server that answers like llama-server and closes idle connections
like cpp-httplib; the last ones use real nodes and the real llama-server."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from meshllm.net import spare_connection
from meshllm.net.raw_http import MAX_HEAD_BYTES, Upstream, open_upstream
from meshllm.net.spare_connection import SpareConnections
from tests.support import NodeProcess, ProcessFactory, model_status, until, wait_until

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
DEADLINE_S = 10.0


@dataclass
class FakeLlama:
    """Counts connections; answers each request; closes a connection idle for ``idle_close_s``, and,
    with ``drop_first_request_on`` set, closes that connection (by number) at its request instead."""

    idle_close_s: float = 30.0
    drop_first_request_on: int = 0
    accepted: list[float] = field(default_factory=list)
    served_on: list[int] = field(default_factory=list)
    closed_idle: list[int] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(time.monotonic())
        number = len(self.accepted)
        try:
            try:
                async with asyncio.timeout(self.idle_close_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                self.closed_idle.append(number)
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if number == self.drop_first_request_on:
                return
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            self.served_on.append(number)
            writer.write(ANSWER)
            await writer.drain()
        finally:
            self.ended.append(number)
            writer.close()


def with_server(
    fake: FakeLlama, body: Callable[[int, SpareConnections], Awaitable[None]], max_age_s: float = 30.0
) -> None:
    async def main() -> None:
        server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        spares = SpareConnections(limit=MAX_HEAD_BYTES, max_age_s=max_age_s)
        try:
            await body(server.sockets[0].getsockname()[1], spares)
        finally:
            spares.close()
            server.close()

    asyncio.run(main())


async def ask(port: int, spares: SpareConnections) -> Upstream:
    up = await open_upstream(
        port, "POST", "/v1/x", {"Content-Type": "application/json"}, b"{}", spares=spares
    )
    assert up.status == 200 and await up.reader.readexactly(2) == b"ok"
    up.close()
    return up


def test_the_request_after_one_ends_goes_on_a_connection_opened_before_it() -> None:
    fake = FakeLlama()

    async def body(port: int, spares: SpareConnections) -> None:
        await ask(port, spares)
        await until(lambda: spares.held(port) and len(fake.accepted) == 2, DEADLINE_S, "a spare")
        asked_at = time.monotonic()
        await ask(port, spares)
        assert fake.served_on == [1, 2], "the second request went on the spare"
        assert fake.accepted[1] < asked_at, "and the spare was open before it was asked"
        await until(lambda: spares.held(port), DEADLINE_S, "the next spare")
        assert len(fake.accepted) == 3

    with_server(fake, body)


def test_a_spare_the_server_closed_is_not_used() -> None:
    fake = FakeLlama(idle_close_s=0.05)

    async def body(port: int, spares: SpareConnections) -> None:
        await ask(port, spares)
        await until(lambda: 2 in fake.closed_idle, DEADLINE_S, "the server to close the idle spare")
        await ask(port, spares)
        assert fake.served_on == [1, 3]

    with_server(fake, body)


def test_a_spare_closed_as_the_request_goes_out_is_replaced() -> None:
    fake = FakeLlama(drop_first_request_on=2)

    async def body(port: int, spares: SpareConnections) -> None:
        await ask(port, spares)
        await until(lambda: spares.held(port), DEADLINE_S, "a spare")
        await ask(port, spares)
        assert fake.served_on == [1, 3], "the request went again on a new connection"

    with_server(fake, body)


def test_a_fresh_connection_that_closes_before_its_head_is_still_an_error() -> None:
    """Only a spare is retried: a new connection that ends before any byte means llama-server failed."""
    fake = FakeLlama(drop_first_request_on=1)

    async def body(port: int, spares: SpareConnections) -> None:
        from meshllm.net.raw_http import UpstreamError

        with pytest.raises(UpstreamError, match="before its response head"):
            await open_upstream(port, "POST", "/v1/x", {}, b"{}", spares=spares)
        assert fake.served_on == [] and len(fake.accepted) == 1

    with_server(fake, body)


def test_a_spare_nobody_takes_is_given_up_after_its_max_age() -> None:
    fake = FakeLlama()

    async def body(port: int, spares: SpareConnections) -> None:
        await ask(port, spares)
        await until(lambda: spares.held(port), DEADLINE_S, "a spare")
        await until(
            lambda: 2 in fake.ended,
            DEADLINE_S,
            "the spare to be closed, holding none of the server's threads",
        )
        assert not spares.held(port) and not fake.closed_idle

    with_server(fake, body, max_age_s=0.2)


def test_there_is_at_most_one_spare_per_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three answers end at once, and each is closed twice: one spare is opened, not six."""
    fake = FakeLlama()
    opened: list[int] = []
    real_connect = spare_connection.connect

    async def counting(port: int, limit: int) -> spare_connection.Connection:
        opened.append(port)
        return await real_connect(port, limit)

    monkeypatch.setattr(spare_connection, "connect", counting)

    async def body(port: int, spares: SpareConnections) -> None:
        ups = await asyncio.gather(
            *(open_upstream(port, "POST", "/", {}, b"", spares=spares) for _ in range(3))
        )
        for up in ups + ups:
            up.close()
        await until(lambda: spares.held(port), DEADLINE_S, "a spare")
        assert opened == [port] and len(fake.accepted) == 4

    with_server(fake, body)


def test_close_drops_the_spares_and_opens_no_more() -> None:
    fake = FakeLlama()

    async def body(port: int, spares: SpareConnections) -> None:
        up = await ask(port, spares)
        await until(lambda: spares.held(port), DEADLINE_S, "a spare")
        spares.close()
        await until(lambda: 2 in fake.ended, DEADLINE_S, "the spare to be closed")
        up.close()
        spares.replenish(port)
        assert not spares.held(port) and len(fake.accepted) == 2

    with_server(fake, body)


def test_no_spares_when_their_max_age_is_zero() -> None:
    fake = FakeLlama()

    async def body(port: int, spares: SpareConnections) -> None:
        await ask(port, spares)
        await ask(port, spares)
        assert fake.served_on == [1, 2] and len(fake.accepted) == 2

    with_server(fake, body, max_age_s=0)


# -- with the real llama-server ---------------------------------------------------------------------------


def llama_connections(node: NodeProcess, llama_port: int) -> list[str]:
    """The states of the node's TCP connections to its llama-server."""
    assert node.proc is not None
    return [
        c.status
        for c in psutil.Process(node.proc.pid).net_connections("tcp")
        if c.raddr and c.raddr.port == llama_port
    ]


def complete(node: NodeProcess) -> str:
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 4, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        str(node.started["api"]) + "/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def serving_node(procs: ProcessFactory, tiny_gguf: Path, max_age_s: str) -> tuple[NodeProcess, int]:
    node = procs.start(
        "host", extra=f'[models]\nserve = ["{tiny_gguf}"]\n', env={"MESHLLM_SPARE_MAX_AGE_S": max_age_s}
    )
    return node, int(node.wait_event("llama.ready", 60, kind="llama-server")["port"])


@pytest.mark.llama
def test_a_node_keeps_a_spare_to_its_llama_server_and_gives_it_up(
    procs: ProcessFactory, tiny_gguf: Path
) -> None:
    """After an answer through the node's own gateway, and after one tunnelled from another node."""
    host, llama_port = serving_node(procs, tiny_gguf, "2")
    asker = procs.start("asker", join=(host.token,))
    wait_until(
        lambda: model_status(asker.console_url, "tiny").get("hosts") == [host.node_id], 60, what="routes"
    )
    for through in (host, asker):
        wait_until(
            lambda: not llama_connections(host, llama_port),
            15,
            what="no spare: the last one given up after 2 s",
        )
        assert "[DONE]" in complete(through)
        wait_until(
            lambda: llama_connections(host, llama_port) == [psutil.CONN_ESTABLISHED],
            10,
            what=f"one connection to llama-server open after the answer through {through.config.stem}: the spare",
        )


@pytest.mark.llama
def test_a_spare_llama_server_closed_is_replaced_without_an_error(
    procs: ProcessFactory, tiny_gguf: Path
) -> None:
    """Kept past llama-server's own 5 s keep-alive wait, the spare is closed by llama-server: the next
    request still gets its answer, and the node logs nothing wrong."""
    node, llama_port = serving_node(procs, tiny_gguf, "60")
    assert "[DONE]" in complete(node)
    wait_until(
        lambda: llama_connections(node, llama_port) == [psutil.CONN_CLOSE_WAIT],
        20,
        what="llama-server to close the idle spare",
    )
    mark = len(node.records())
    assert "[DONE]" in complete(node)
    assert not [r for r in node.records()[mark:] if r.get("level") in ("warning", "error")]
