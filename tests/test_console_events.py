"""The console's HTTP side with in-process nodes: the page and its files, ``GET /api/events`` (status at
once, again on a change, keep-alives, clean end on node stop and on client disconnect), the timeline in
the status, and the chat relay to the node's API."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshllm.console import server as console_server
from meshllm.node import Node
from tests.support import NodeFactory, console_status, wait_until


async def sse_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line:
            yield line


async def next_status(lines: AsyncIterator[str], timeout: float) -> dict[str, Any] | None:
    """The next ``data:`` event, or ``None`` when the stream ended."""

    async def read() -> dict[str, Any] | None:
        async for line in lines:
            if line.startswith("data: "):
                body: dict[str, Any] = json.loads(line[len("data: ") :])
                return body
        return None

    return await asyncio.wait_for(read(), timeout)


def subscribers(node: Node) -> int:
    assert node.console is not None
    return node.console._feed._subscribers


def test_page_and_its_files_are_served(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    with urllib.request.urlopen(a.console_url + "/", timeout=5) as resp:
        page = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
    assert 'src="static/app.js"' in page and 'href="static/app.css"' in page
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        with urllib.request.urlopen(f"{a.console_url}/static/{name}", timeout=5) as resp:
            assert kind in resp.headers["Content-Type"] and resp.read()


def test_events_stream_status_at_once_then_on_change_and_end_on_node_stop(nodes: NodeFactory) -> None:
    a = nodes.start("a", vram_gb=2.0)

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.get(a.console_url + "/api/events") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            lines = sse_lines(resp)
            t0 = time.monotonic()
            first = await next_status(lines, timeout=5)
            assert first is not None and first["node_id"] == a.node_id and first["peers"] == []
            assert time.monotonic() - t0 < 2.0, "the first status must come at once"
            assert first["api_url"] == a.api_url

            loop = asyncio.get_running_loop()
            b = await loop.run_in_executor(None, lambda: nodes.start("b", join=(a.invite_token,)))
            while True:  # every change is pushed; wait for the one with b
                body = await next_status(lines, timeout=20)
                assert body is not None, "the stream ended before b joined"
                if [p["node_id"] for p in body["peers"]] == [b.node_id]:
                    break
            assert any(e["kind"] == "joined" and e["node_id"] == b.node_id for e in body["timeline"])

            stopping = loop.run_in_executor(None, a.stop)
            t1 = time.monotonic()
            async for _ in lines:  # drain: the stream must end, not hang or break
                pass
            assert time.monotonic() - t1 < 10
            await stopping

    asyncio.run(asyncio.wait_for(run(), 60))


def test_events_send_keepalives_and_stop_polling_when_the_client_leaves(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_server, "KEEPALIVE_S", 0.3)
    monkeypatch.setattr(console_server, "CHECK_S", 0.1)
    a = nodes.start("a")

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(a.console_url + "/api/events") as resp:
                lines = sse_lines(resp)
                assert await next_status(lines, timeout=5) is not None
                assert subscribers(a) == 1

                async def keepalive() -> str:
                    async for line in lines:
                        if line.startswith(":"):
                            return line
                    return ""

                assert await asyncio.wait_for(keepalive(), 5) == ": keep-alive"
            # The client went away: the handler notices and the poller stops.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None, lambda: wait_until(lambda: subscribers(a) == 0, 5, what="the handler to end")
            )
            assert a.console is not None and a.console._feed._task is None

    asyncio.run(asyncio.wait_for(run(), 30))


def test_an_unchanged_status_is_not_pushed_again(nodes: NodeFactory) -> None:
    a = nodes.start("a")

    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.get(a.console_url + "/api/events") as resp:
            lines = sse_lines(resp)
            assert await next_status(lines, timeout=5) is not None
            with pytest.raises(asyncio.TimeoutError):  # several poll ticks, nothing new
                await next_status(lines, timeout=2.0)

    asyncio.run(run())


def test_status_carries_the_timeline_and_the_api_url(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: b.node_id in {p["node_id"] for p in console_status(a.console_url)["peers"]}, 20)
    body = console_status(a.console_url)
    assert body["api_url"] == a.api_url
    joined = [e for e in body["timeline"] if e["kind"] == "joined"]
    assert [(e["node_id"], e["name"]) for e in joined] == [(b.node_id, "b")]
    b.stop()
    wait_until(
        lambda: console_status(a.console_url)["timeline"][0]["kind"] == "left", 10, what="b's leaving"
    )


def test_the_chat_relay_reaches_the_nodes_api(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    with urllib.request.urlopen(a.console_url + "/v1/models", timeout=5) as resp:
        assert json.loads(resp.read()) == {"object": "list", "data": []}
    request = urllib.request.Request(
        a.console_url + "/v1/chat/completions",
        data=json.dumps({"model": "nothing", "messages": []}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 404  # the gateway's own answer, relayed
    assert "error" in json.loads(err.value.read())


def test_the_readme_shows_the_console() -> None:
    """docs/console.png is a copy of test_console_page's 3-node screenshot (test-artifacts/)."""
    root = Path(__file__).resolve().parent.parent
    assert (root / "docs" / "console.png").stat().st_size > 10_000
    assert "docs/console.png" in (root / "README.md").read_text()


def test_every_page_file_is_package_data() -> None:
    """A wheel (not only the editable install) must carry the page: pyproject's package-data globs
    cover every file in meshllm/console/static."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "meshllm.console"
    ]
    files = [p.relative_to(console_server.STATIC.parent).as_posix() for p in console_server.STATIC.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
