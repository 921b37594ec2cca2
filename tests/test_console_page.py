"""The console page in a real headless Chromium: a 3-node mesh of node processes (bars that match the
data to the pixel, a kill -9 shown live, a streamed chat reply through real llama.cpp), 200 made-up
nodes (render time), and odd statuses - never a JavaScript error."""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from meshllm.config import ConsoleSection, HostPort
from meshllm.node import Node
from tests.browser import ARTIFACTS, fake_console, severe_logs
from tests.support import LogCapture, NodeFactory, ProcessFactory, console_status, model_status, wait_until

GIB = 1 << 30
FAST = "[timing]\nprobe_interval_s = 0.5\ndead_after_s = 2.0\n"
SMOLLM = "smollm2-135m"

BARS_JS = """
return [...document.querySelectorAll('.node')].map((n) => {
  const bar = (cls) => {
    const track = n.querySelector('.bar.' + cls);
    return {track: track.clientWidth, fill: track.querySelector('.fill').getBoundingClientRect().width};
  };
  const usage = n.querySelector('.bar.usage');
  const capacity = n.querySelector('.bar.capacity');
  return {id: n.dataset.nodeId, vram: Number(n.dataset.vramBytes), used: Number(n.dataset.usedBytes),
          fraction: Number(usage.dataset.usedFraction), capacity: Number(capacity.dataset.capacityFraction),
          usage_bar: bar('usage'), capacity_bar: bar('capacity')};
});
"""


def node_ids(driver: Any) -> list[str]:
    return list(driver.execute_script("return [...document.querySelectorAll('.node')].map(n => n.dataset.nodeId)"))


def check_bars(bars: list[dict[str, Any]]) -> None:
    """Every bar's fill is its data fraction of its track, within a pixel."""
    for b in bars:
        for name, fraction in (("usage_bar", b["fraction"]), ("capacity_bar", b["capacity"])):
            bar = b[name]
            assert bar["track"] > 50, f"{b['id']} {name} is not laid out: {bar}"
            assert abs(bar["fill"] - fraction * bar["track"]) <= 1.0, f"{b['id']} {name}: {bar} vs {fraction}"
        expected = min(1.0, b["used"] / b["vram"]) if b["vram"] else 0.0
        assert abs(b["fraction"] - expected) <= 0.0006, b  # three decimals


def wait_rendered(driver: Any, renders: int, timeout: float = 10) -> None:
    wait_until(
        lambda: driver.execute_script("return window.meshllmConsole && window.meshllmConsole.renders") >= renders,
        timeout,
        what=f"{renders} renders",
    )


# -- a real mesh ----------------------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.slow
def test_three_node_mesh_page_bars_kill_and_chat(procs: ProcessFactory, driver: Any) -> None:
    serve = f'[models]\nserve = ["{SMOLLM}"]\n'
    a = procs.start("a", extra=serve + FAST, node_extra="vram_gb = 0.3")
    b = procs.start("b", join=(a.token,), extra=serve + FAST, node_extra="vram_gb = 0.25")
    c = procs.start("c", join=(a.token,), extra=FAST, node_extra="vram_gb = 0.5")
    ids = {a.node_id, b.node_id, c.node_id}
    wait_until(
        lambda: set(model_status(a.console_url, SMOLLM).get("hosts", [])) == {a.node_id, b.node_id}
        and {p["node_id"] for p in console_status(a.console_url)["peers"]} == ids - {a.node_id},
        90,
        what="both hosts serving and all three nodes known",
    )

    driver.get(a.console_url + "/")
    wait_until(lambda: set(node_ids(driver)) == ids, 10, what="three nodes on the page")
    size = model_status(a.console_url, SMOLLM)["size_bytes"]
    bars = {b_["id"]: b_ for b_ in driver.execute_script(BARS_JS)}
    check_bars(list(bars.values()))
    assert {i: (bars[i]["vram"], bars[i]["used"]) for i in ids} == {
        a.node_id: (int(0.3 * GIB), size),
        b.node_id: (int(0.25 * GIB), size),
        c.node_id: (int(0.5 * GIB), 0),
    }
    state = driver.execute_script(f"return document.querySelector('.model[data-model=\"{SMOLLM}\"]').dataset.state")
    assert state == "solo"

    # The chat panel streams a reply from this node's API (through the console's relay).
    wait_until(
        lambda: driver.execute_script("return document.getElementById('chat-model').value") == SMOLLM,
        10,
        what="the model picker",
    )
    driver.execute_script(
        "window.chatUpdates = 0;"
        "new MutationObserver(() => { window.chatUpdates += 1; })"
        ".observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});"
    )
    driver.find_element("id", "chat-input").send_keys("Name three colours.")
    driver.find_element("id", "chat-send").click()
    reply = wait_until(
        lambda: driver.execute_script(
            "const m = document.querySelector('.msg.assistant[data-done=\"true\"]');"
            "return m ? [m.textContent, m.classList.contains('error')] : null;"
        ),
        60,
        what="the chat reply",
    )
    assert reply[0].strip() and not reply[1], reply
    assert driver.execute_script("return window.chatUpdates") > 3, "the reply came in one piece, not streamed"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "console-3-nodes.png"
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # kill -9 of a node shows on the page without a reload within 5 s.
    renders = driver.execute_script("return window.meshllmConsole.renders")
    c.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: c.node_id not in node_ids(driver), 5, what="c to leave the page")
    print(f"kill -9 -> page updated in {time.monotonic() - killed:.2f} s")
    assert driver.execute_script("return window.meshllmConsole.renders") > renders
    died = driver.execute_script("return document.querySelector('#timeline li').dataset.kind")
    assert died == "died"
    check_bars(driver.execute_script(BARS_JS))
    assert severe_logs(driver) == []


# -- made-up statuses -------------------------------------------------------------------------------


def big_status(n: int) -> dict[str, Any]:
    """``n`` nodes (this one and n - 1 peers), a model per ten nodes, some split, some waiting."""
    peers = [
        {
            "node_id": f"{i:032x}",
            "name": f"node-{i:03d}",
            "role": "active",
            "vram_bytes": (4 + i % 5 * 4) * GIB,
            "models": [f"model-{i // 10}"],
            "serving": [f"model-{i // 10}"] if i % 3 == 0 else [],
            "last_seen_s": 0.2,
        }
        for i in range(1, n)
    ]
    models = []
    for k in range(n // 10):
        members = [p["node_id"] for p in peers if p["models"] == [f"model-{k}"]]
        split = k % 4 == 1 and len(members) >= 3
        models.append(
            {
                "name": f"model-{k}",
                "state": "split" if split else ("waiting" if k % 4 == 2 else "solo"),
                "hosts": members[:1],
                "host": members[0] if members else "",
                "workers": members[1:3] if split else [],
                "fractions": [0.5, 0.3, 0.2] if split else [],
                "size_bytes": (k % 7 + 1) * GIB,
                "needed_bytes": (k % 7 + 2) * GIB,
                "available_bytes": GIB,
                "demand_per_min": float(k),
                "detail": "",
                "download": None,
            }
        )
    timeline = [
        {"seq": 60 - i, "ts": "2026-01-01T00:00:00Z", "kind": "joined", "node_id": p["node_id"], "name": p["name"]}
        for i, p in enumerate(peers[:50])
    ]
    return {
        "node_id": "f" * 32,
        "name": "self",
        "role": "active",
        "vram_bytes": 24 * GIB,
        "peers": peers,
        "dead": [],
        "models": models,
        "gpus": [
            {"index": 0, "uuid": None, "name": "H200", "total_bytes": 16 * GIB, "free_bytes": 3 * GIB},
            {"index": 1, "uuid": None, "name": "H200", "total_bytes": 8 * GIB, "free_bytes": 8 * GIB},
        ],
        "passive_connections": 40,
        "standby_connections": 3,
        "timeline": timeline,
        "api_url": "http://127.0.0.1:9337/v1",
    }


def test_two_hundred_nodes_render(tmp_path: Path, driver: Any) -> None:
    with fake_console([big_status(200)]) as server:
        t0 = time.monotonic()
        driver.get(server.url + "/")
        wait_until(lambda: len(node_ids(driver)) == 200, 30, what="200 nodes on the page")
        wall = time.monotonic() - t0
        render_ms = driver.execute_script("return window.meshllmConsole.lastRenderMs")
        print(f"200 nodes: render() {render_ms:.1f} ms; page load to 200 nodes {wall * 1000:.0f} ms")
        assert render_ms < 10_000  # a sanity bound against a hang, not a benchmark
        check_bars(driver.execute_script(BARS_JS)[:20])
        gpu = driver.execute_script(
            "return [...document.querySelectorAll('.node.self .bar.gpu-bar')].map(b => b.dataset.usedFraction)"
        )
        assert gpu == ["0.813", "0.000"]
        assert driver.execute_script("return document.querySelectorAll('#timeline li').length") == 50
        counts = driver.execute_script(
            "return [document.querySelector('[data-clients]').dataset.clients,"
            " document.querySelector('[data-standbys]').dataset.standbys]"
        )
        assert counts == ["37", "3"]
        assert severe_logs(driver) == []


ODD: list[dict[str, Any]] = [
    {},
    {"node_id": "a" * 32, "name": "no-gpus", "vram_bytes": 8 * GIB},  # nothing else at all
    {"node_id": "a" * 32, "peers": None, "models": "x", "gpus": [None, 3, {"name": "g"}], "timeline": [None, 5]},
    {
        "node_id": "a" * 32,
        "name": "<script>alert(1)</script>",
        "vram_bytes": 0,
        "peers": [{"node_id": "b" * 32}, {"vram_bytes": "lots"}, None, {"node_id": "a" * 32}],
        "models": [
            {"name": "no-size", "state": "solo", "hosts": ["b" * 32]},
            {"name": "odd-split", "state": "split", "host": "b" * 32, "workers": ["z"], "fractions": [1]},
            {"name": "dl", "state": "waiting", "download": {"state": "downloading"}},
            {"name": "refused", "state": "refused", "download": {"state": "refused", "reason": "too big"}},
            {"state": "solo"},
            None,
        ],
        "standby": {"offers": None},
        "timeline": [{"kind": "promoted", "seq": "x", "ts": "not a date"}],
    },
    {"node_id": "a" * 32, "name": "fine", "vram_bytes": GIB, "peers": [], "models": [], "gpus": []},
]


def test_odd_statuses_raise_no_javascript_errors(tmp_path: Path, driver: Any) -> None:
    with fake_console(ODD) as server:
        driver.get(server.url + "/")
        wait_rendered(driver, len(ODD))
        assert severe_logs(driver) == []
        assert driver.execute_script("return document.getElementById('error').hidden") is True
        assert node_ids(driver) == ["a" * 32]
    # The odd one before last, alone: every model is there with its state, and the title is text.
    with fake_console([ODD[3]]) as server:
        driver.get(server.url + "/")
        wait_rendered(driver, 1)
        models = driver.execute_script(
            "return [...document.querySelectorAll('.model')].map(m => [m.dataset.model, m.dataset.state])"
        )
        assert models == [
            ["no-size", "solo"],
            ["odd-split", "split"],
            ["dl", "downloading"],
            ["refused", "refused"],
        ]
        assert "<script>" in driver.execute_script("return document.getElementById('whoami').textContent")
        assert sorted(node_ids(driver)) == ["a" * 32, "b" * 32]
        assert severe_logs(driver) == []


def test_peers_announce_their_model_sizes_and_gpus(tmp_path: Path, driver: Any) -> None:
    """A model only a peer runs has no size in this node's status: the peer's announced size fills
    its usage bar, and the peer's GPUs get bars of their own."""
    peer = {
        "node_id": "b" * 32,
        "name": "peer",
        "role": "active",
        "vram_bytes": 8 * GIB,
        "models": ["theirs"],
        "serving": ["theirs"],
        "model_bytes": {"theirs": 2 * GIB},
        "gpus": [{"name": "NVIDIA L4", "total_bytes": 8 * GIB, "free_bytes": 6 * GIB}],
    }
    status = {
        "node_id": "a" * 32,
        "name": "me",
        "vram_bytes": 4 * GIB,
        "peers": [peer],
        "models": [{"name": "theirs", "state": "solo", "hosts": ["b" * 32], "size_bytes": 0}],
    }
    with fake_console([status]) as server:
        driver.get(server.url + "/")
        wait_rendered(driver, 1)
        bars = {b_["id"]: b_ for b_ in driver.execute_script(BARS_JS)}
        assert bars["b" * 32]["used"] == 2 * GIB and bars["b" * 32]["fraction"] == 0.25
        check_bars(list(bars.values()))
        gpu = driver.execute_script(
            f"return document.querySelector('.node[data-node-id=\"{'b' * 32}\"] .gpu-bar').dataset.usedFraction"
        )
        assert gpu == "0.250"
        assert severe_logs(driver) == []


def test_page_reconnects_when_the_node_restarts(nodes: NodeFactory, tmp_path: Path, driver: Any) -> None:
    """The node stops and starts again on the same console port: the open page shows it again, live,
    without a reload."""
    first = nodes.start("a")
    assert first.console is not None
    pinned = dataclasses.replace(
        first.config, console=ConsoleSection(listen=HostPort("127.0.0.1", first.console.port))
    )
    driver.get(first.console_url + "/")
    wait_until(lambda: node_ids(driver) == [first.node_id], 10, what="the node on the page")
    driver.execute_script("window.reloaded = false;")  # gone if the page reloads
    first.stop()
    wait_until(
        lambda: driver.execute_script("return document.getElementById('conn').dataset.state") == "reconnecting",
        10,
        what="the page to see the node gone",
    )
    again = Node(pinned, log_stream=LogCapture()).start()
    nodes.nodes.append(again)  # stopped at teardown
    renders = driver.execute_script("return window.meshllmConsole.renders")
    wait_until(
        lambda: driver.execute_script("return window.meshllmConsole.connected && window.meshllmConsole.renders")
        > renders,
        10,
        what="the page to reconnect and render",
    )
    assert driver.execute_script("return window.reloaded") is False
    assert node_ids(driver) == [again.node_id]
    # Refused connections while the node was down are expected; JavaScript errors are not.
    assert [e for e in severe_logs(driver) if e.get("source") != "network"] == []
