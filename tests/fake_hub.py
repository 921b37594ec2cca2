"""A fake Hugging Face Hub on 127.0.0.1, for testing downloads offline against real files.

It speaks the part of the Hub's HTTP API that ``huggingface_hub`` 2.4.0 uses to learn about a model and
fetch its files:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``HfApi.model_info``; with
  ``?blobs=true``, i.e. ``files_metadata=True``, each sibling has ``size``, ``blobId`` and ``lfs``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=`` (``list_repo_tree`` and
  ``list_repo_files``), paginated with a ``Link: <...>; rel="next"`` header every ``tree_page_size`` entries;
* ``POST /api/models/{repo}/paths-info/{rev}`` (``get_paths_info``, form-encoded ``paths`` and ``expand``);
* ``HEAD`` and ``GET /{repo}/resolve/{rev}/{filename}`` (``get_hf_file_metadata``, ``hf_hub_download``
  and plain ranged GETs): ``X-Repo-Commit``, a quoted ``ETag``, and for LFS files ``X-Linked-Etag``
  (the sha256) and ``X-Linked-Size``; ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` answer 206 with
  ``Content-Range``, no range answers 200.  No Xet header is ever sent, so ``hf_xet`` is never used.
  With ``FakeHub(cdn=True)`` an LFS file's resolve URL answers ``302`` to a second server on another port
  (another origin), as the real Hub redirects to its CDN.

Errors carry ``X-Error-Code`` as the Hub's do, so the client raises its typed errors: unknown repo ->
404 ``RepoNotFound`` (``RepositoryNotFoundError``), unknown revision -> 404 ``RevisionNotFound``
(``RevisionNotFoundError``), unknown file -> 404 ``EntryNotFound`` (``RemoteEntryNotFoundError``, also an
``EntryNotFoundError``), a file of a gated repo without ``Authorization: Bearer <token>`` -> 401
``GatedRepo`` and with another token -> 403 ``GatedRepo`` (``GatedRepoError``, a subclass of
``RepositoryNotFoundError``: catch it first).  As on the real Hub, a gated repo's metadata (info, tree,
paths-info) is readable without a token; only its files are gated.

Files are streamed from disk in 64 KiB pieces (never read whole), and their hashes are computed once
per (path, size, mtime) and cached for the session.

Pointing ``huggingface_hub`` at the fake.  ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import,
into ``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (what ``hf_hub_url``
formats), and the module-level functions (``huggingface_hub.model_info`` ...) are bound methods of an
``HfApi`` built at import, whose ``endpoint`` was frozen then.  Setting the environment variable in a
test is therefore too late for this process.  Two ways work:

* explicitly, which is what production code should support anyway: ``HfApi(endpoint=hub.url)``,
  ``hf_hub_url(repo, file, endpoint=hub.url)``, ``hf_hub_download(repo, file, endpoint=hub.url)``;
* or patch the copies: ``hub.patch_huggingface_hub(monkeypatch, cache_dir=...)`` (what the ``fake_hub``
  fixture does) sets ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
  ``huggingface_hub.hf_api.api.endpoint`` and the ``HF_ENDPOINT`` environment variable (for child
  processes, which import ``huggingface_hub`` afresh), points ``constants.HF_HUB_CACHE`` (and
  ``HF_HUB_CACHE``) at ``cache_dir``, and hides any token of the machine's (``HF_TOKEN`` and the token
  file).  An ``HfApi()`` made after the patch uses the fake.

The same holds for offline mode: ``HF_HUB_OFFLINE`` is read at import, so a test sets
``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)`` (or passes
``local_files_only=True``).

Usage::

    from tests.fake_hub import FakeHub, fake_hub_fixture  # noqa: F401  (provides the fixture `fake_hub`)
    # (``from tests.fake_hub import fake_hub`` works too, with ``# noqa: F811`` on each test taking it)

    def test_download(fake_hub: FakeHub) -> None:
        fake_hub.add_file("org/repo", "model.gguf", b"...")
        path = hf_hub_download("org/repo", "model.gguf")

What 2.4.0 does on the wire (pinned by tests/test_fake_hub.py): ``hf_hub_download`` sends a HEAD on the
resolve URL, then one GET of the ``location`` the HEAD gave (the resolve URL itself, or the CDN URL after a
302, without ``Authorization`` when that is another origin); it writes ``blobs/<etag>.<8 hex>.incomplete``
and renames it.  A body cut mid-way is retried in the same call after a 1 s sleep, from the last whole
10 MiB chunk (``Range: bytes=<k*10MiB>-``).  A HEAD that cannot connect is retried 5 times with 1+2+4+8+8 s of
backoff before ``LocalEntryNotFoundError``.  It checks the size, never the sha256.

Test hooks: ``throttle`` (slow bodies), ``fail_after`` (cut the next bodies mid-way, closing the
connection), ``stall_after``/``release`` (hold bodies mid-way until released, so a test can kill a
downloader at a known point), ``corrupt`` (serve bytes that do not match the advertised sha256), and the
records ``requests``, ``request_headers``, ``body_bytes_served``, ``wait_for_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

DEFAULT_REVISION = "main"
DEFAULT_TREE_PAGE_SIZE = 1000
"""The Hub's page size for tree listings (50 when ``expand=true``)."""
EXPANDED_TREE_PAGE_SIZE = 50
FAKE_DATE = "2024-01-01T00:00:00.000Z"
_PIECE = 64 * 1024
_HASH_CACHE: dict[tuple[str, int, int], tuple[str, str]] = {}
_HASH_CACHE_LOCK = threading.Lock()


class HubRequest(NamedTuple):
    """One request the fake received: method, raw request target (path and query), Range header."""

    method: str
    path: str
    range: str | None


@dataclass(frozen=True)
class HubFile:
    """A file the fake serves, with the hashes it advertises."""

    repo_id: str
    filename: str
    size: int
    sha256: str
    blob_id: str
    """The git object id: sha1 of the LFS pointer for LFS files, of the content for plain git files."""
    lfs: bool
    source: Path | bytes = field(repr=False)

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores in place of an LFS file."""
        return _lfs_pointer(self.sha256, self.size)

    @property
    def etag(self) -> str:
        """What ``huggingface_hub`` takes as the etag (and names the cached blob by): sha256 or git oid."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Repo:
    repo_id: str
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)
    gated_token: str | None = None

    def directories(self) -> set[str]:
        dirs: set[str] = set()
        for name in self.files:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, read in pieces; cached per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HASH_CACHE_LOCK:
        cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {stat.st_size}\0".encode())
    with path.open("rb") as fh:
        while piece := fh.read(1 << 20):
            sha256.update(piece)
            sha1.update(piece)
    result = (sha256.hexdigest(), sha1.hexdigest())
    with _HASH_CACHE_LOCK:
        _HASH_CACHE[key] = result
    return result


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The inclusive byte range asked for, None for the whole file, or "unsatisfiable"."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # not a single byte range: serve the whole file, as servers may
    first, _, last = spec.strip().partition("-")
    try:
        if first.strip() == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return (max(size - suffix, 0), size - 1) if size else "unsatisfiable"
        start = int(first)
        end = int(last) if last.strip() else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class FakeHub:
    """A threaded HTTP server that answers like the Hugging Face Hub for the files added to it.

    ``FakeHub()`` starts serving at once on ``url`` (``http://127.0.0.1:<port>``); ``close()`` (or leaving
    the ``with`` block) stops it and cuts open connections.  ``cdn=True`` adds a second server
    (``cdn_url``) that serves LFS files after a 302 from the resolve URL, as the real Hub's CDN does.
    """

    def __init__(self, *, cdn: bool = False, tree_page_size: int = DEFAULT_TREE_PAGE_SIZE) -> None:
        self.tree_page_size = tree_page_size
        self.requests: list[HubRequest] = []
        """Every request received, in order (the CDN's too: their paths start with ``/lfs/``)."""
        self.request_headers: list[dict[str, str]] = []
        """The headers of each request in ``requests`` (same index), names lower-cased."""
        self._lock = threading.Condition()
        self._repos: dict[str, _Repo] = {}
        self._served: dict[tuple[str, str], int] = {}
        self._corrupt: set[tuple[str, str]] = set()
        self._throttle: float | None = None
        self._fail_after: int | None = None
        self._fail_times = 0
        self._stall_after: int | None = None
        self._stall_gate = threading.Event()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = self._start_server(is_cdn=False)
        self._cdn_server = self._start_server(is_cdn=True) if cdn else None

    # --- setup ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The endpoint to give ``huggingface_hub`` (``HF_ENDPOINT``), without a trailing slash."""
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def cdn_url(self) -> str | None:
        """The CDN server's base URL when ``cdn=True``, else None."""
        if self._cdn_server is None:
            return None
        return f"http://127.0.0.1:{self._cdn_server.server_port}"

    @staticmethod
    def commit_for(repo_id: str) -> str:
        """The commit sha the fake reports for ``repo_id`` (fixed per repo id)."""
        return hashlib.sha1(f"fake-hub commit {repo_id}".encode()).hexdigest()

    def add_file(
        self,
        repo_id: str,
        filename: str,
        content: Path | str | bytes,
        *,
        gated_token: str | None = None,
        lfs: bool = True,
    ) -> HubFile:
        """Serve ``content`` (a path, streamed from disk, or bytes) as ``filename`` in model repo ``repo_id``.

        The repo is created on first use.  ``gated_token`` gates the whole repo: its files then need
        ``Authorization: Bearer <gated_token>``.  ``lfs=False`` stores the file in git instead of LFS (the
        etag is then the git blob sha1 and there are no ``X-Linked-*`` headers), as the Hub does for small
        text files.
        """
        if not filename or filename.startswith("/") or ".." in filename.split("/"):
            raise ValueError(f"bad filename {filename!r}")
        if isinstance(content, bytes):
            source: Path | bytes = content
            size = len(content)
            sha256 = hashlib.sha256(content).hexdigest()
            git_sha1 = hashlib.sha1(f"blob {size}\0".encode() + content).hexdigest()
        else:
            source = Path(content)
            size = source.stat().st_size
            sha256, git_sha1 = _hash_file(source)
        pointer = _lfs_pointer(sha256, size)
        blob_id = hashlib.sha1(f"blob {len(pointer)}\0".encode() + pointer).hexdigest() if lfs else git_sha1
        hub_file = HubFile(repo_id, filename, size, sha256, blob_id, lfs, source)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, self.commit_for(repo_id)))
            if gated_token is not None:
                if repo.gated_token not in (None, gated_token):
                    raise ValueError(f"{repo_id} is already gated with another token")
                repo.gated_token = gated_token
            repo.files[filename] = hub_file
        return hub_file

    def file(self, repo_id: str, filename: str) -> HubFile:
        """The ``HubFile`` added as ``filename`` in ``repo_id`` (KeyError if none)."""
        with self._lock:
            return self._repos[repo_id].files[filename]

    def patch_huggingface_hub(self, monkeypatch: pytest.MonkeyPatch, cache_dir: Path | None = None) -> None:
        """Point this process's ``huggingface_hub`` (and child processes' ``HF_ENDPOINT``) at the fake.

        Also removes ``HF_TOKEN`` from the environment and, when ``cache_dir`` is given, points the Hub
        cache at it and the token file next to it (absent), so a test neither reads nor writes the user's
        cache and sends only the tokens it passes.
        """
        from huggingface_hub import constants, hf_api

        endpoint = self.url
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(var, raising=False)
        if cache_dir is not None:
            cache_dir = Path(cache_dir)
            monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
            token_path = str(cache_dir.parent / "hf-token-absent")
            monkeypatch.setenv("HF_TOKEN_PATH", token_path)
            monkeypatch.setattr(constants, "HF_TOKEN_PATH", token_path)

    # --- test hooks ----------------------------------------------------------------------------------

    def throttle(self, bytes_per_s: float | None) -> None:
        """Send every GET body at about ``bytes_per_s`` from now on (None: full speed, also mid-body)."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        with self._lock:
            self._throttle = bytes_per_s

    def fail_after(self, n_bytes: int | None, times: int = 1) -> None:
        """Cut each of the next ``times`` GET bodies after ``n_bytes`` bytes by closing the connection.

        The client sees a truncated body (``httpx2.RemoteProtocolError``).  ``None`` cancels.
        """
        with self._lock:
            self._fail_after = n_bytes
            self._fail_times = times if n_bytes is not None else 0

    def stall_after(self, n_bytes: int) -> None:
        """Hold every GET body after its first ``n_bytes`` bytes until ``release()`` (or ``close()``)."""
        with self._lock:
            self._stall_after = n_bytes
            self._stall_gate = threading.Event()

    def release(self) -> None:
        """Let stalled bodies go on, and stop stalling new ones."""
        with self._lock:
            self._stall_after = None
            self._stall_gate.set()

    def corrupt(self, repo_id: str, filename: str, corrupted: bool = True) -> None:
        """Serve ``filename`` with its last byte flipped (same size; headers still advertise the true sha256)."""
        with self._lock:
            if self._repos[repo_id].files[filename].size == 0:
                raise ValueError("cannot corrupt an empty file")
            if corrupted:
                self._corrupt.add((repo_id, filename))
            else:
                self._corrupt.discard((repo_id, filename))

    # --- records -------------------------------------------------------------------------------------

    def body_bytes_served(self, repo_id: str, filename: str) -> int:
        """Bytes of GET bodies sent for this file so far (HEAD, metadata and errors excluded)."""
        with self._lock:
            return self._served.get((repo_id, filename), 0)

    def wait_for_bytes(self, repo_id: str, filename: str, n_bytes: int, timeout: float) -> int:
        """Block until at least ``n_bytes`` of the file's bodies were sent; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (served := self._served.get((repo_id, filename), 0)) < n_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{repo_id}/{filename}: {served} of {n_bytes} bytes served in {timeout} s"
                    )
                self._lock.wait(left)
            return served

    def requests_for(self, method: str | None = None, contains: str = "") -> list[HubRequest]:
        """The recorded requests with this method (any when None) whose path contains ``contains``."""
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    # --- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, release stalled bodies and cut open connections (idempotent)."""
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            self._stall_gate.set()
        servers = [s for s in (self._server, self._cdn_server) if s is not None]
        for server in servers:
            server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for server in servers:
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------------

    def _start_server(self, is_cdn: bool) -> _Server:
        server = _Server(("127.0.0.1", 0), _Handler, self, is_cdn)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        thread.start()
        return server

    def _record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append(HubRequest(method, path, headers.get("range")))
            self.request_headers.append(headers)

    def _count(self, key: tuple[str, str], n: int) -> None:
        with self._lock:
            self._served[key] = self._served.get(key, 0) + n
            self._lock.notify_all()

    def _body_plan(self) -> tuple[int | None, int | None, threading.Event]:
        """(cut after, stall after, stall gate) for a body starting now."""
        with self._lock:
            cut = None
            if self._fail_times > 0 and self._fail_after is not None:
                cut = self._fail_after
                self._fail_times -= 1
            return cut, self._stall_after, self._stall_gate

    def _repo(self, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _check_revision(repo: _Repo, revision: str) -> None:
        if revision not in (DEFAULT_REVISION, repo.commit):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    @staticmethod
    def _check_gate(repo: _Repo, headers: dict[str, str]) -> None:
        if repo.gated_token is None:
            return
        auth = headers.get("authorization", "")
        if not auth:
            raise _HubError(
                401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be"
                " authenticated to access it. Please log in.",
            )
        if auth != f"Bearer {repo.gated_token}":
            raise _HubError(
                403,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
                f" Visit https://huggingface.co/{repo.repo_id} to ask for access.",
            )

    def _split_repo(self, segments: list[str]) -> tuple[str, list[str]]:
        """(repo id, rest) from path segments: one segment if it names a known repo, else two."""
        with self._lock:
            if segments and segments[0] in self._repos:
                return segments[0], segments[1:]
        return "/".join(segments[:2]), segments[2:]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: FakeHub, is_cdn: bool
    ) -> None:
        super().__init__(address, handler)
        self.hub = hub
        self.is_cdn = is_cdn

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-response is normal here (tests kill downloaders)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small JSON replies in two writes: Nagle held the second ~40 ms
    server: _Server
    timeout = 60  # an idle keep-alive connection's thread ends after this

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # --- routing -------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        headers = {k.lower(): v for k, v in self.headers.items()}
        hub._record(method, self.path, headers)
        length = int(headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            if self.server.is_cdn:
                self._cdn(method, segments, query)
            elif segments[:2] == ["api", "models"]:
                self._api(method, segments[2:], query, headers, body)
            elif segments[:1] == ["api"]:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            else:
                self._resolve(method, split.path, headers)
        except _HubError as err:
            self._send_error(method, err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(
        self,
        method: str,
        segments: list[str],
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        hub = self.server.hub
        repo_id, rest = hub._split_repo(segments)
        repo = hub._repo(repo_id)
        if method in ("GET", "HEAD") and not rest:
            return self._send_json(method, self._model_info(repo, _flag(query, "blobs")))
        if method in ("GET", "HEAD") and len(rest) == 2 and rest[0] == "revision":
            hub._check_revision(repo, rest[1])
            return self._send_json(method, self._model_info(repo, _flag(query, "blobs")))
        if method in ("GET", "HEAD") and len(rest) >= 2 and rest[0] == "tree":
            hub._check_revision(repo, rest[1])
            return self._tree(method, repo, rest[1], "/".join(rest[2:]), query)
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            hub._check_revision(repo, rest[1])
            if headers.get("content-type", "").startswith("application/json"):
                data = json.loads(body or b"{}")
                paths = data.get("paths", [])
                expand = bool(data.get("expand", False))
            else:
                form = parse_qs(body.decode())
                paths = form.get("paths", [])
                expand = _flag(form, "expand")
            entries = [e for p in paths if (e := self._entry(repo, p.strip("/"), expand)) is not None]
            return self._send_json(method, entries)
        raise _HubError(404, None, "Not Found")

    def _model_info(self, repo: _Repo, blobs: bool) -> dict[str, Any]:
        with self.server.hub._lock:
            files = sorted(repo.files.values(), key=lambda f: f.filename)
        siblings: list[dict[str, Any]] = []
        for f in files:
            sibling: dict[str, Any] = {"rfilename": f.filename}
            if blobs:
                sibling["blobId"] = f.blob_id
                sibling["size"] = f.size
                if f.lfs:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
            siblings.append(sibling)
        has_gguf = any(f.filename.endswith(".gguf") for f in files)
        return {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": repo.commit,
            "lastModified": FAKE_DATE,
            "createdAt": FAKE_DATE,
            "private": False,
            "disabled": False,
            "gated": "manual" if repo.gated_token is not None else False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"] if has_gguf else [],
            "library_name": "gguf" if has_gguf else None,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in files),
        }

    def _entry(self, repo: _Repo, path: str, expand: bool) -> dict[str, Any] | None:
        """The tree entry for ``path``: a file, a directory, or None."""
        with self.server.hub._lock:
            hub_file = repo.files.get(path)
            is_dir = path in repo.directories()
        last_commit = {"id": repo.commit, "title": "Upload files", "date": FAKE_DATE}
        if hub_file is not None:
            entry: dict[str, Any] = {
                "type": "file",
                "oid": hub_file.blob_id,
                "size": hub_file.size,
                "path": path,
            }
            if hub_file.lfs:
                entry["lfs"] = {
                    "oid": hub_file.sha256,
                    "size": hub_file.size,
                    "pointerSize": len(hub_file.pointer),
                }
        elif is_dir:
            tree_oid = hashlib.sha1(f"tree {repo.commit} {path}".encode()).hexdigest()
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        else:
            return None
        if expand:
            entry["lastCommit"] = last_commit
        return entry

    def _tree(self, method: str, repo: _Repo, revision: str, path: str, query: dict[str, list[str]]) -> None:
        hub = self.server.hub
        path = path.strip("/")
        recursive = _flag(query, "recursive")
        expand = _flag(query, "expand")
        with hub._lock:
            names = sorted(repo.files)
            dirs = sorted(repo.directories())
        if path and path not in dirs:
            raise _HubError(404, "EntryNotFound", f'{path} does not exist on "{revision}"')
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        listed = [d for d in dirs if wanted(d)] + [n for n in names if wanted(n)]
        entries = [e for p in listed if (e := self._entry(repo, p, expand)) is not None]
        page_size = min(hub.tree_page_size, EXPANDED_TREE_PAGE_SIZE) if expand else hub.tree_page_size
        cursor = int((query.get("cursor") or ["0"])[0])
        page = entries[cursor : cursor + page_size]
        extra: dict[str, str] = {}
        if cursor + page_size < len(entries):
            params = urlencode(
                {
                    "recursive": str(recursive).lower(),
                    "expand": str(expand).lower(),
                    "cursor": str(cursor + page_size),
                }
            )
            next_url = f"{hub.url}{urlsplit(self.path).path}?{params}"
            extra["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(method, page, extra)

    def _resolve(self, method: str, raw_path: str, headers: dict[str, str]) -> None:
        hub = self.server.hub
        if method not in ("GET", "HEAD"):
            raise _HubError(405, None, "Method not allowed")
        raw = raw_path.split("/")[1:]
        segments = [unquote(s) for s in raw]
        repo_id, rest = hub._split_repo(segments)
        if len(rest) < 3 or rest[0] != "resolve":
            raise _HubError(404, None, "Not Found")
        repo = hub._repo(repo_id)
        hub._check_gate(repo, headers)
        revision, filename = rest[1], "/".join(rest[2:])
        hub._check_revision(repo, revision)
        with hub._lock:
            hub_file = repo.files.get(filename)
        commit_header = {"X-Repo-Commit": repo.commit}
        if hub_file is None:
            raise _HubError(
                404, "EntryNotFound", f'{filename} does not exist on "{revision}"', headers=commit_header
            )
        meta = {**commit_header, "ETag": f'"{hub_file.etag}"', "Accept-Ranges": "bytes"}
        if hub_file.lfs:
            meta["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            meta["X-Linked-Size"] = str(hub_file.size)
        if hub_file.lfs and hub.cdn_url is not None:
            query = urlencode({"repo": repo.repo_id, "file": filename})
            location = f"{hub.cdn_url}/lfs/{hub_file.sha256}?{query}"
            self.send_response(302)
            for name, value in {**meta, "Location": location, "Content-Length": "0"}.items():
                self.send_header(name, value)
            self.end_headers()
            return
        self._send_file(method, hub_file, meta, headers.get("range"))

    def _cdn(self, method: str, segments: list[str], query: dict[str, list[str]]) -> None:
        hub = self.server.hub
        repo_id = (query.get("repo") or [""])[0]
        filename = (query.get("file") or [""])[0]
        with hub._lock:
            repo = hub._repos.get(repo_id)
            hub_file = repo.files.get(filename) if repo is not None else None
        if method not in ("GET", "HEAD") or len(segments) != 2 or segments[0] != "lfs" or hub_file is None:
            raise _HubError(404, None, "NoSuchKey")
        if hub_file.sha256 != segments[1]:
            raise _HubError(404, None, "NoSuchKey")
        meta = {"ETag": f'"{hub_file.sha256}"', "Accept-Ranges": "bytes"}
        self._send_file(method, hub_file, meta, self.headers.get("Range"))

    # --- responses -----------------------------------------------------------------------------------

    def _send_json(self, method: str, payload: object, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _send_error(self, method: str, err: _HubError) -> None:
        data = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if err.code is not None:
            self.send_header("X-Error-Code", err.code)
        self.send_header("X-Error-Message", err.message)
        for name, value in err.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _send_file(
        self, method: str, hub_file: HubFile, meta: dict[str, str], range_header: str | None
    ) -> None:
        size = hub_file.size
        wanted = _parse_range(range_header, size)
        if wanted == "unsatisfiable":
            raise _HubError(
                416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"}
            )
        start, end = wanted if isinstance(wanted, tuple) else (0, size - 1)
        length = end - start + 1 if size else 0
        self.send_response(206 if isinstance(wanted, tuple) else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if isinstance(wanted, tuple):
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for name, value in meta.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        self._stream(hub_file, start, length)

    def _stream(self, hub_file: HubFile, start: int, length: int) -> None:
        hub = self.server.hub
        key = (hub_file.repo_id, hub_file.filename)
        with hub._lock:
            corrupt = key in hub._corrupt
        cut, stall, gate = hub._body_plan()
        sent = 0
        fh = hub_file.source.open("rb") if isinstance(hub_file.source, Path) else None
        try:
            if fh is not None:
                fh.seek(start)
            while sent < length:
                if hub._closing.is_set():
                    break
                if stall is not None and sent >= stall:
                    while not gate.wait(0.05):
                        if hub._closing.is_set():
                            break
                    stall = None
                with hub._lock:
                    rate = hub._throttle
                piece = min(_PIECE, length - sent)
                if rate is not None:
                    piece = min(piece, max(1024, int(rate / 20)))
                for limit in (cut, stall):
                    if limit is not None and sent < limit:
                        piece = min(piece, limit - sent)
                if cut is not None and sent >= cut:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                offset = start + sent
                if fh is not None:
                    chunk = fh.read(piece)
                else:
                    assert isinstance(hub_file.source, bytes)
                    chunk = hub_file.source[offset : offset + piece]
                if not chunk:
                    break  # the file shrank on disk: end short, the client sees a truncated body
                if corrupt and offset <= hub_file.size - 1 < offset + len(chunk):
                    i = hub_file.size - 1 - offset
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                # Counted before the write: a client that has the bytes must see them counted.
                hub._count(key, len(chunk))
                self.wfile.write(chunk)
                sent += len(chunk)
                if rate is not None:
                    time.sleep(len(chunk) / rate)  # pacing the body, not waiting on a condition
        finally:
            if fh is not None:
                fh.close()
        if sent < length:
            self.close_connection = True


def _flag(query: dict[str, list[str]], name: str) -> bool:
    values = query.get(name)
    if not values:
        return False
    return values[-1].strip().lower() in ("1", "true", "yes")


@pytest.fixture(name="fake_hub")
def fake_hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running ``FakeHub`` that this process's ``huggingface_hub`` points at, with its cache in tmp_path.

    See ``FakeHub.patch_huggingface_hub``: ``HfApi()``, ``hf_hub_url``, ``hf_hub_download`` and the module-level
    functions all reach the fake; the Hub cache is ``tmp_path / "hf-cache"``; no ambient token is sent.
    """
    with FakeHub() as hub:
        hub.patch_huggingface_hub(monkeypatch, cache_dir=tmp_path / "hf-cache")
        yield hub


fake_hub = fake_hub_fixture
"""The same fixture under its own name, for ``from tests.fake_hub import fake_hub`` (then ``# noqa: F811``
on each test that takes it); importing ``fake_hub_fixture`` avoids the noqa."""
