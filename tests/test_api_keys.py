"""API keys for a node's HTTP servers reachable from other machines: the config refuses a
non-loopback ``[api]``/``[console] listen`` without ``api_keys`` (unless ``open = true``); the
gateway answers 401 in OpenAI's shape without a valid Bearer key and serves the official openai
client with one; the console takes a Bearer key, ``?key=`` or its login cookie (the page itself,
EventSource included, runs on the cookie); the console's chat relay sends the gateway a key."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from meshllm.config import ApiSection, ConfigError, ConsoleSection, HostPort, load_config, parse_config
from meshllm.console import client
from meshllm.node import Node
from meshllm.serving.api_keys import KeyCheck, fingerprint
from tests.browser import severe_logs
from tests.support import REPO, LogCapture, NodeFactory, node_config, wait_until

KEY = "k3y-for-the-api-0123456789abcdef"
OTHER_KEY = "another-api-key-fedcba9876543210"
CONSOLE_KEY = "console-key-00112233445566778899"
WILDCARD = HostPort("0.0.0.0", 0)


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["api", "console"])
@pytest.mark.parametrize("listen", ["0.0.0.0:9000", "[::]:9000", "192.168.1.5:9000", "example.com:9000"])
def test_non_loopback_listen_without_keys_is_refused(section: str, listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({section: {"listen": listen}})
    assert err.value.key == f"{section}.api_keys"
    message = str(err.value)
    assert f"{section}.api_keys" in message and f"{section}.open = true" in message and "Bearer" in message


@pytest.mark.parametrize("section", ["api", "console"])
def test_non_loopback_listen_with_keys_or_open_is_accepted(section: str) -> None:
    keyed = parse_config({section: {"listen": "0.0.0.0:9000", "api_keys": [KEY, OTHER_KEY]}})
    assert getattr(keyed, section).api_keys == (KEY, OTHER_KEY)
    opened = parse_config({section: {"listen": "0.0.0.0:9000", "open": True}})
    assert getattr(opened, section).open is True and getattr(opened, section).api_keys == ()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "[::1]"])
def test_loopback_listen_needs_no_keys(host: str) -> None:
    cfg = parse_config({"api": {"listen": f"{host}:1"}, "console": {"listen": f"{host}:2"}})
    assert cfg.api.api_keys == () and cfg.console.api_keys == () and not cfg.api.open


def test_default_config_has_no_keys() -> None:
    cfg = parse_config({})
    assert cfg.api == ApiSection() and cfg.console == ConsoleSection()
    assert cfg.api.api_keys == () and cfg.console.api_keys == ()


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        (KEY, "api.api_keys", "array of strings"),
        ([KEY, 7], "api.api_keys[1]", "expected a string"),
        ([True], "api.api_keys[0]", "expected a string"),
        (["short"], "api.api_keys[0]", "at least 16"),
        (["a key with spaces in it!"], "api.api_keys[0]", "without spaces"),
        (["\u00e9" * 20], "api.api_keys[0]", "printable ASCII"),
        ([""], "api.api_keys[0]", "must not be empty"),
        ({"k": KEY}, "api.api_keys", "array"),
    ],
)
def test_key_lists_are_type_checked(value: Any, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"api": {"listen": "0.0.0.0:9000", "api_keys": value}})
    assert err.value.key == key and fragment in str(err.value)


def test_open_must_be_a_boolean_and_not_mixed_with_keys() -> None:
    with pytest.raises(ConfigError, match=r"api\.open: expected a boolean"):
        parse_config({"api": {"listen": "0.0.0.0:9000", "open": "yes"}})
    with pytest.raises(ConfigError, match=r"console\.open: open = true serves without keys"):
        parse_config({"console": {"listen": "0.0.0.0:9000", "open": True, "api_keys": [KEY]}})
    with pytest.raises(ConfigError, match=r"did you mean api\.api_keys"):
        parse_config({"api": {"api_key": [KEY]}})


def test_sections_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"api\.api_keys"):
        ApiSection(listen=WILDCARD)
    assert ConsoleSection(listen=WILDCARD, api_keys=[KEY]).api_keys == (KEY,)  # type: ignore[arg-type]


def test_node_toml_without_keys_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[api]\nlisten = "0.0.0.0:9337"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: api.api_keys:") and err.value.key == "api.api_keys"


def test_meshllm_run_refuses_to_start_without_keys(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nname = "n"\ndata_dir = "{tmp_path / "n"}"\nquic_listen = "127.0.0.1:0"\n'
        '[api]\nlisten = "0.0.0.0:0"\n[console]\nlisten = "127.0.0.1:0"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "meshllm", "run", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode != 0
    assert "api.api_keys" in run.stdout + run.stderr
    assert "node.started" not in run.stdout + run.stderr


def test_key_check() -> None:
    check = KeyCheck([KEY, OTHER_KEY])
    assert check.required and check.valid(KEY) and check.valid(OTHER_KEY)
    for wrong in (None, "", KEY[:-1], KEY + "x", KEY.upper(), "\udcff", "é"):
        assert not check.valid(wrong)
    assert not KeyCheck([]).required and not KeyCheck([]).valid(KEY)
    assert fingerprint(KEY).startswith("sha256:") and KEY not in fingerprint(KEY)


# -- nodes with keys -------------------------------------------------------------------------------


def keyed_node(
    nodes: NodeFactory, name: str, api: ApiSection, console: ConsoleSection | None = None, **node: Any
) -> Node:
    """An in-process node with these [api] / [console] sections, stopped at teardown."""
    cfg = node_config(nodes.tmp, name, **node)
    cfg = dataclasses.replace(cfg, api=api, console=console or cfg.console)
    capture = LogCapture()
    nodes.logs[name] = capture
    started = Node(cfg, log_stream=capture).start()
    nodes.nodes.append(started)
    return started


def loopback(url: str) -> str:
    """A URL on a wildcard address, reached on loopback."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:")


def call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def all_logged(capture: LogCapture) -> str:
    return json.dumps(capture.records)


def test_gateway_without_a_valid_key_is_401_in_openai_shape(nodes: NodeFactory) -> None:
    a = keyed_node(nodes, "a", ApiSection(listen=WILDCARD, api_keys=(KEY, OTHER_KEY)))
    base = loopback(a.api_url)
    chat = json.dumps({"model": "m", "messages": []}).encode()
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("/models", None, {}, "missing_api_key"),
        ("/chat/completions", chat, json_type, "missing_api_key"),
        ("/completions", b"\x00garbage", json_type, "missing_api_key"),
        ("/nowhere", None, {}, "missing_api_key"),
        ("/models", None, bearer("wrong-key-0123456789abcdef"), "invalid_api_key"),
        ("/models", None, bearer(KEY + "x"), "invalid_api_key"),
        ("/chat/completions", chat, {**json_type, **bearer(KEY[:-1])}, "invalid_api_key"),
        ("/models", None, {"Authorization": f"Basic {KEY}"}, "missing_api_key"),
        ("/models", None, {"Authorization": "Bearer "}, "missing_api_key"),
    ]
    for path, body, headers, code in cases:
        status, response_headers, raw = call(base + path, body, headers)
        assert status == 401, (path, headers, raw)
        error = json.loads(raw)["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
        assert response_headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert call(loopback(a.api_url[: -len("/v1")]) + "/health")[0] == 200  # health checks need no key
    for key in (KEY, OTHER_KEY):
        status, _, raw = call(base + "/models", headers=bearer(key))
        assert status == 200 and json.loads(raw)["object"] == "list"
    status, _, raw = call(base + "/chat/completions", chat, {**json_type, **bearer(KEY)})
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"  # past the key check
    logged = all_logged(nodes.logs["a"])
    assert KEY not in logged and OTHER_KEY not in logged
    (record,) = nodes.logs["a"].find("gateway.api_keys")
    assert record["keys"] == [fingerprint(KEY), fingerprint(OTHER_KEY)]


def test_openai_client_with_the_key_on_a_wildcard_listen(nodes: NodeFactory) -> None:
    a = keyed_node(nodes, "a", ApiSection(listen=WILDCARD, api_keys=(KEY,)))
    good = openai.OpenAI(base_url=loopback(a.api_url), api_key=KEY, max_retries=0, timeout=30)
    assert good.models.list().data == []  # 200, and nothing is served yet
    bad = openai.OpenAI(base_url=loopback(a.api_url), api_key="not-the-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_loopback_default_needs_no_key(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    assert call(a.api_url + "/models")[0] == 200
    assert call(a.console_url + "/api/status")[0] == 200
    assert call(a.console_url + "/")[0] == 200
    assert not nodes.logs["a"].find("gateway.api_keys") and not nodes.logs["a"].find("console.api_keys")


def test_console_with_its_key(nodes: NodeFactory) -> None:
    a = keyed_node(
        nodes,
        "a",
        ApiSection(listen=HostPort("127.0.0.1", 0)),
        ConsoleSection(listen=WILDCARD, api_keys=(CONSOLE_KEY,)),
    )
    base = loopback(a.console_url)
    # Without a key: JSON 401 for the API, the login form for the page.
    for path in ("/api/status", "/api/events", "/v1/models", "/static/app.js"):
        status, _, raw = call(base + path)
        assert status == 401 and json.loads(raw)["error"]["code"] == "missing_api_key", path
    status, headers, raw = call(base + "/")
    assert status == 401 and headers["Content-Type"].startswith("text/html") and b'name="key"' in raw
    assert call(base + "/api/status", headers=bearer("wrong-console-key-0123"))[0] == 401
    assert call(base + "/api/status?key=wrong-console-key-0123")[0] == 401
    # A script: Bearer header or ?key=.
    for status, _, raw in (
        call(base + "/api/status", headers=bearer(CONSOLE_KEY)),
        call(base + "/api/status?key=" + CONSOLE_KEY),
    ):
        assert status == 200 and json.loads(raw)["node_id"] == a.node_id
    # A browser: /?key= (or the form) sets the cookie and sends the page back to a URL without the key.
    opener = urllib.request.build_opener(NoRedirect)
    for resp in (
        opener_call(opener, base + "/?key=" + CONSOLE_KEY),
        opener_call(opener, base + "/login", urllib.parse.urlencode({"key": CONSOLE_KEY}).encode()),
    ):
        assert resp.status == 303 and CONSOLE_KEY not in resp.headers["Location"]
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and CONSOLE_KEY not in cookie
    assert opener_call(opener, base + "/login", b"key=wrong-console-key-0123").status == 401
    jar = {"Cookie": cookie.split(";", 1)[0]}
    assert call(base + "/", headers=jar)[0] == 200
    status, _, raw = call(base + "/api/status", headers=jar)
    assert status == 200 and json.loads(raw)["node_id"] == a.node_id
    name, _, _ = jar["Cookie"].partition("=")
    assert call(base + "/api/status", headers={"Cookie": f"{name}=0123abcd"})[0] == 401
    # The event stream the page opens, with the cookie: the status arrives.
    req = urllib.request.Request(base + "/api/events", headers=jar)
    with urllib.request.urlopen(req, timeout=10) as stream:
        line = b""
        while not line.startswith(b"data: "):
            line = stream.readline()
    assert json.loads(line[len(b"data: ") :])["node_id"] == a.node_id
    assert CONSOLE_KEY not in all_logged(nodes.logs["a"])
    assert nodes.logs["a"].find("console.api_keys")[0]["keys"] == [fingerprint(CONSOLE_KEY)]


def test_meshllm_status_asks_a_keyed_console_with_the_env_key(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = keyed_node(
        nodes,
        "a",
        ApiSection(listen=HostPort("127.0.0.1", 0)),
        ConsoleSection(listen=WILDCARD, api_keys=(CONSOLE_KEY,)),
    )
    url = client.status_url(loopback(a.console_url))
    monkeypatch.delenv(client.KEY_ENV, raising=False)
    with pytest.raises(client.StatusError, match=client.KEY_ENV) as err:
        client.fetch_status(url)
    assert "401" in str(err.value) and "API key" in str(err.value)
    monkeypatch.setenv(client.KEY_ENV, CONSOLE_KEY)
    assert client.fetch_status(url)["node_id"] == a.node_id


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def opener_call(opener: urllib.request.OpenerDirector, url: str, body: bytes | None = None) -> Any:
    try:
        return opener.open(url, data=body, timeout=10)
    except urllib.error.HTTPError as err:
        return err


def test_console_relay_sends_the_gateway_its_key(nodes: NodeFactory) -> None:
    a = keyed_node(nodes, "a", ApiSection(listen=WILDCARD, api_keys=(KEY,)))
    assert call(loopback(a.api_url) + "/models")[0] == 401  # the gateway itself wants the key
    status, _, raw = call(a.console_url + "/v1/models")  # the console (loopback, no keys) relays
    assert status == 200 and json.loads(raw)["object"] == "list"
    chat = json.dumps({"model": "nope", "messages": []}).encode()
    status, _, raw = call(a.console_url + "/v1/chat/completions", chat, {"Content-Type": "application/json"})
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"  # past the key check


@pytest.mark.llama
def test_keyed_node_serves_chat_directly_through_a_tunnel_and_the_relay(
    nodes: NodeFactory, tiny_gguf: Path
) -> None:
    host = keyed_node(nodes, "host", ApiSection(listen=WILDCARD, api_keys=(KEY,)), serve=(str(tiny_gguf),))
    front = keyed_node(nodes, "front", ApiSection(listen=WILDCARD, api_keys=(OTHER_KEY,)), join=(host.invite_token,))
    clients = [
        openai.OpenAI(base_url=loopback(host.api_url), api_key=KEY, max_retries=0, timeout=60),
        openai.OpenAI(base_url=loopback(front.api_url), api_key=OTHER_KEY, max_retries=0, timeout=60),
        openai.OpenAI(base_url=front.console_url + "/v1", api_key="ignored", max_retries=0, timeout=60),
    ]
    for c in clients:
        wait_until(lambda c=c: "tiny" in {m.id for m in c.models.list().data}, 60, what="tiny served")
    answers = []
    for c in clients:
        reply = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0
        )
        answers.append(reply.choices[0].message.content)
    assert answers[0] and answers == [answers[0]] * 3
    stream = clients[1].chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == answers[0]


def test_console_page_logs_in_and_goes_live_on_its_cookie(nodes: NodeFactory, driver: Any) -> None:
    """The page in a real browser: the login form, then the page itself with its EventSource and its
    fetches carried by the cookie alone."""
    from selenium.webdriver.common.by import By

    a = keyed_node(
        nodes,
        "a",
        ApiSection(listen=HostPort("127.0.0.1", 0)),
        ConsoleSection(listen=WILDCARD, api_keys=(CONSOLE_KEY,)),
    )
    base = loopback(a.console_url)
    driver.get(base + "/")
    driver.find_element(By.ID, "key").send_keys("wrong-console-key-0123")
    driver.find_element(By.ID, "login").click()
    wait_until(lambda: "not one of" in driver.find_element(By.ID, "login-error").text, 10, what="refusal")
    driver.find_element(By.ID, "key").send_keys(CONSOLE_KEY)
    driver.find_element(By.ID, "login").click()
    wait_until(
        lambda: driver.execute_script("return window.meshllmConsole && window.meshllmConsole.connected"),
        15,
        what="the page to connect its event stream",
    )
    wait_until(
        lambda: driver.execute_script("return [...document.querySelectorAll('.node')].map(n => n.dataset.nodeId)")
        == [a.node_id],
        10,
        what="the node on the page",
    )
    assert driver.current_url.rstrip("/") == base and CONSOLE_KEY not in driver.current_url
    assert driver.execute_script("return document.cookie") == ""  # HttpOnly: the page's code never sees it
    assert driver.execute_script("return fetch('v1/models').then((r) => r.status)") == 200
    assert [e for e in severe_logs(driver) if "401" not in e.get("message", "")] == []
