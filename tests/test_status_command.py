"""``meshllm status``: finding the console (URL, config), fetching with one-line errors, --watch, and
the whole command against a live mesh of two node processes."""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshllm.config import ConsoleSection, HostPort, NodeConfig, default_config
from meshllm.console import client
from tests.support import REPO, ProcessFactory, console_status, wait_until, write_config


def meshllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_status_url_takes_what_people_type() -> None:
    assert client.status_url("http://127.0.0.1:3131") == "http://127.0.0.1:3131/api/status"
    assert client.status_url("127.0.0.1:3131/") == "http://127.0.0.1:3131/api/status"
    assert client.status_url("http://h:1/api/status") == "http://h:1/api/status"


def test_console_url_from_config() -> None:
    def with_listen(text: str) -> NodeConfig:
        listen = HostPort.parse(text, "console.listen")
        return dataclasses.replace(default_config(), console=ConsoleSection(listen=listen, open=True))

    assert client.console_url(default_config()) == "http://127.0.0.1:3131"
    assert client.console_url(with_listen("0.0.0.0:4000")) == "http://127.0.0.1:4000"
    assert client.console_url(with_listen("[::]:4000")) == "http://[::1]:4000"
    with pytest.raises(client.StatusError, match="--url"):
        client.console_url(with_listen("127.0.0.1:0"))


class Answers(BaseHTTPRequestHandler):
    """Answers every GET with the server's ``answer``: (HTTP code, body)."""

    server: Answering

    def do_GET(self) -> None:
        code, body = self.server.answer
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Answering(ThreadingHTTPServer):
    answer: tuple[int, str] = (200, "{}")


@pytest.fixture
def console() -> Iterator[Answering]:
    """A stand-in console on loopback; its URL is ``url(server)``."""
    server = Answering(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def url(server: Answering) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_odd_answers_are_one_line_errors(console: Answering) -> None:
    cases = {
        (503, '{"error": "status unavailable: stopping"}'): "HTTP 503: status unavailable: stopping",
        (200, "<html>"): "did not answer JSON",
        (200, "[1, 2]"): "not a status object",
        (404, ""): "HTTP 404",
    }
    status_url = client.status_url(url(console))
    for answer, message in cases.items():
        console.answer = answer
        with pytest.raises(client.StatusError) as info:
            client.fetch_status(status_url)
        assert message in str(info.value) and "\n" not in str(info.value)
        assert status_url in str(info.value)
    console.answer = (200, '{"name": "n"}')
    assert client.fetch_status(status_url) == {"name": "n"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def stop_after(looks: int) -> Any:
    """A wait for ``show`` that lets ``looks`` looks happen, then acts like Ctrl-C."""
    count = [0]

    def wait(seconds: float) -> None:
        count[0] += 1
        if count[0] >= looks:
            raise KeyboardInterrupt

    return wait


def test_watch_redraws_on_a_terminal_and_appends_otherwise(console: Answering) -> None:
    console.answer = (200, '{"name": "watched"}')
    tty, err = Tty(), io.StringIO()
    assert client.show(url(console), watch=True, out=tty, err=err, wait=stop_after(3)) == 0
    assert tty.getvalue().count(client.CLEAR) == 3 and tty.getvalue().count("seen from watched") == 3
    plain = io.StringIO()
    assert client.show(url(console), watch=True, out=plain, err=err, wait=stop_after(2)) == 0
    assert "\x1b" not in plain.getvalue() and plain.getvalue().count("NODES") == 2
    lines = io.StringIO()
    assert client.show(url(console), as_json=True, watch=True, out=lines, err=err, wait=stop_after(2)) == 0
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == [{"name": "watched"}] * 2
    # A console that goes away while watched is reported in place of the picture, not fatal.
    gone = io.StringIO()
    assert client.show(f"127.0.0.1:{free_port()}", watch=True, out=gone, err=err, wait=stop_after(2)) == 0
    assert gone.getvalue().count("cannot reach the console") == 2
    assert err.getvalue() == ""


def test_unreachable_console_is_a_one_line_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = meshllm("status", "--url", url)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and url + "/api/status" in out.stderr
    assert "cannot reach the console" in out.stderr and "Traceback" not in out.stderr


def test_help_explains_status() -> None:
    out = meshllm("status", "--help")
    assert out.returncode == 0
    for option in ("--config", "--url", "--json", "--watch", "--interval"):
        assert option in out.stdout


@pytest.mark.llama
def test_status_of_a_live_two_node_mesh(procs: ProcessFactory, tiny_gguf: Path, tmp_path: Path) -> None:
    serve = f'[models]\nserve = ["{tiny_gguf}"]\n'
    a = procs.start("alpha", extra=serve, node_extra="vram_gb = 2.0")
    # beta's console on a fixed port, so that `status --config beta.toml` can find it.
    beta_config = write_config(tmp_path, "beta", (a.token,), serve, "vram_gb = 1.0")
    beta_port = free_port()
    text = beta_config.read_text().replace(
        '[console]\nlisten = "127.0.0.1:0"', f'[console]\nlisten = "127.0.0.1:{beta_port}"'
    )
    beta_config.write_text(text)
    b = procs.start("beta")
    assert b.console_url == f"http://127.0.0.1:{beta_port}"

    def both_serve() -> bool:
        for proc in (a, b):
            status = console_status(proc.console_url)
            tiny: dict[str, Any] = next((m for m in status["models"] if m["name"] == "tiny"), {})
            if len(status["peers"]) != 1 or len(tiny.get("hosts", ())) != 2 or tiny["state"] != "solo":
                return False
        return True

    wait_until(both_serve, 90, interval=0.2, what="alpha and beta both serving tiny solo")

    out = meshllm("status", "--url", a.console_url)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    lines = out.stdout.splitlines()
    alpha = next(line for line in lines if line.startswith("  alpha "))
    beta = next(line for line in lines if line.startswith("  beta "))
    assert a.node_id[:8] in alpha and "this node" in alpha and "serving" in alpha
    assert b.node_id[:8] in beta and "serving" in beta
    assert any(line.startswith("  tiny  solo") for line in lines)
    assert "served by: alpha, beta" in out.stdout
    assert "2.0 GiB" in out.stdout and "1.0 GiB" in out.stdout

    raw = meshllm("status", "--url", a.console_url, "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["node_id"] == a.node_id

    by_config = meshllm("status", "--config", str(beta_config))
    assert by_config.returncode == 0, by_config.stderr
    assert f"seen from beta ({b.node_id[:8]}" in by_config.stdout and "  alpha " in by_config.stdout

    # --watch until Ctrl-C, into a file (not a terminal): successive plain blocks, exit 0.
    with open(tmp_path / "watch.out", "wb") as sink:
        # Started as a background job of a non-interactive shell would be: SIGINT ignored on entry.
        ignoring_sigint = (
            "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "from meshllm.cli import main; sys.argv[0] = 'meshllm'; main()"
        )
        watch = subprocess.Popen(
            [
                sys.executable,
                "-c",
                ignoring_sigint,
                "status",
                "--url",
                b.console_url,
                "--watch",
                "--interval",
                "0.2",
            ],
            stdout=sink,
            stderr=subprocess.PIPE,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        wait_until(lambda: (tmp_path / "watch.out").read_text().count("NODES (2)") >= 2, 30, what="two looks")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0  # Ctrl-C ends it with 0 (30 s: a loaded machine is slow, not wrong)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    watched = (tmp_path / "watch.out").read_text()
    assert "\x1b" not in watched and "seen from beta" in watched


def test_config_without_a_fixed_console_port_says_to_use_url(tmp_path: Path) -> None:
    config = write_config(tmp_path, "n")  # console.listen = "127.0.0.1:0"
    out = meshllm("status", "--config", str(config))
    assert out.returncode == 2 and "--url" in out.stderr and "Traceback" not in out.stderr
    both = meshllm("status", "--config", str(config), "--url", "http://127.0.0.1:1")
    assert both.returncode == 2 and "not both" in both.stderr
