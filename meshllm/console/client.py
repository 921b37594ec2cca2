"""``meshllm status``: fetch a node's ``/api/status`` and print it once, as JSON, or again and again.

Kept apart from the CLI so that the command stays one call, and from the renderer
(:mod:`meshllm.console.terminal`) so that the picture stays a pure function. Fetching is plain
``urllib``: one GET a second needs no event loop. A console with ``[console] api_keys`` is asked with
the key in ``MESHLLM_CONSOLE_KEY`` (an environment variable, so that it shows in no command line).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from meshllm.config import NodeConfig
from meshllm.console.terminal import render

__all__ = ["DEFAULT_URL", "StatusError", "console_url", "fetch_status", "show", "status_url"]

DEFAULT_URL = "http://127.0.0.1:3131"
FETCH_TIMEOUT_S = 5.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
KEY_ENV = "MESHLLM_CONSOLE_KEY"


class StatusError(Exception):
    """The console could not be asked, or answered something that is not a status; one line for people."""


def status_url(url: str) -> str:
    """``http://host:port/api/status`` from what a user types: with or without scheme or the path."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/api/status") else url + "/api/status"


def console_url(cfg: NodeConfig) -> str:
    """The console URL a node with this config listens on; a wildcard listen is asked on loopback."""
    listen = cfg.console.listen
    if listen.port == 0:
        raise StatusError(
            f"console.listen is {listen} (a port picked at start): pass the running node's console "
            "with --url (its node.started log line names it)"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def fetch_status(url: str, timeout: float = FETCH_TIMEOUT_S) -> dict[str, Any]:
    """GET the status JSON at ``url`` (already a :func:`status_url`)."""
    key = os.environ.get(KEY_ENV, "").strip()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        reason = exc.reason
        try:
            error = json.loads(exc.read()).get("error") or reason
            reason = error.get("message") or reason if isinstance(error, dict) else error
        except Exception:  # the body is a page or nothing: the HTTP reason says enough
            pass
        if exc.code == 401:
            reason = f"{reason} (put one of its [console] api_keys in {KEY_ENV})"
        raise StatusError(f"the console at {url} answered HTTP {exc.code}: {reason}") from None
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach the console at {url}: {_reason(exc.reason)}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, odd URLs
        raise StatusError(f"cannot reach the console at {url}: {_reason(exc)}") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise StatusError(f"the console at {url} did not answer JSON (is it a meshllm console?)") from None
    if not isinstance(body, dict):
        raise StatusError(f"the console at {url} answered JSON that is not a status object")
    return body


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _width(out: TextIO) -> int:
    return shutil.get_terminal_size((100, 24)).columns if out.isatty() else 100


def _block(url: str, as_json: bool, width: int) -> str:
    status = fetch_status(url)
    return json.dumps(status) + "\n" if as_json else render(status, width)


def show(
    url: str,
    as_json: bool = False,
    watch: bool = False,
    interval: float = 1.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
    wait: Callable[[float], object] | None = None,
) -> int:
    """Print the status at ``url`` (once, or every ``interval`` seconds until Ctrl-C); the exit code.

    Once: 0, or 1 with one line on ``err`` when the console cannot be asked. Watching: a failed fetch
    is shown in place of the picture and asked again (the node may be restarting); Ctrl-C gives 0.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    url = status_url(url)
    if not watch:
        try:
            out.write(_block(url, as_json, _width(out)))
        except StatusError as exc:
            err.write(f"meshllm: {exc}\n")
            return 1
        except KeyboardInterrupt:  # Ctrl-C while a slow console is being asked
            return 130
        return 0
    pause = wait or threading.Event().wait
    tty = out.isatty()
    try:
        while True:
            started = time.monotonic()
            try:
                block = _block(url, as_json, _width(out))
            except StatusError as exc:
                block = f"meshllm: {exc}\n"
            if tty:
                out.write(CLEAR + block)
            elif as_json:
                out.write(block)
            else:
                out.write(f"--- {time.strftime('%H:%M:%S')} {url}\n{block}\n")
            out.flush()
            pause(max(interval - (time.monotonic() - started), 0.05))
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0
