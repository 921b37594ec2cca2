"""Models on the Hugging Face hub: what a reference names (files, sizes, checksums, shape), whether
it is already in the local cache, and fetching it - resumably, verified, into the cache.

huggingface_hub does the talking: its ``HfApi`` for metadata, its URLs, headers (``HF_TOKEN``), its
endpoint (``HF_ENDPOINT``), cache location (``HF_HUB_CACHE``/``HF_HOME``) and offline switch
(``HF_HUB_OFFLINE``), and its HTTP client for the metadata and the ranged read of a file's head. The
bulk bytes go through the standard library's client with the same URL and headers (the token only to
the hub, never to the storage it redirects to): huggingface_hub's httpx2 client reached a third of its
throughput on loopback (tests/bench/bench_download.py). Its own downloader is not used: huggingface_hub 2.4.0
writes each process's partial download to a new random name, so a node killed mid-download would
start again at byte 0 (see DESIGN.md). Here the partial file has a stable name per blob
(``blobs/<sha256>.meshllm-partial``), a restart continues it with a ranged request, and the finished
file is checked against the hub's sha256 before it is moved into the cache's usual layout
(``blobs/<sha256>``, ``snapshots/<commit>/<file>`` linked to it, ``refs/<revision>``), where every hub
tool finds it offline. A file is never used before its checksum matched.

huggingface_hub is imported by the methods that use it, not with this module: it (with httpx2 and
trio) takes half a second to import, which every node and every ``meshllm`` command would pay, while
only a node or command that names a hub model needs it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshllm.models.digest import BackgroundSha256
from meshllm.models.files import FileChoiceError, files_for_name, files_for_quant
from meshllm.models.gguf_shape import MAX_HEAD_BYTES, ModelShape, NeedMoreBytes, model_shape
from meshllm.models.refs import HubRef
from meshllm.serving.gguf_layout import GGUFError

CHUNK = 1 << 20
REMOTE_HEAD_BYTES = 64 << 10
"""The first ranged read of a file's head; it grows x4 while the metadata runs on. Small, so the fit
check of a model that does not fit fetches none of its weights (metadata comes before tensor data)."""
PARTIAL = ".meshllm-partial"
VERIFIED = ".meshllm-verified"


class HubError(Exception):
    """A reference that cannot be had: not found, gated, unreachable, offline, corrupt. The message
    names the reference and says what to do."""


class DownloadStopped(Exception):
    """The caller asked a fetch to stop (the node is stopping); the partial file is kept."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # in the repository
    size: int
    sha256: str


@dataclass(frozen=True)
class RemoteModel:
    """What the hub says about a reference, before any weight is fetched."""

    ref: HubRef
    commit: str
    files: tuple[RemoteFile, ...]  # one, or every shard in order
    shape: ModelShape | None

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _repo_folder(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def _sha256_of(path: Path, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK * 8):
            if stop is not None and stop.is_set():
                raise DownloadStopped()
            digest.update(block)
    return digest.hexdigest()


class Hub:
    """One node's view of the hub and of its local model cache."""

    def __init__(
        self, cache_dir: Path | None = None, endpoint: str | None = None, token: str | None = None
    ) -> None:
        from huggingface_hub import HfApi, constants

        self.cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.token = token  # None: huggingface_hub's own (HF_TOKEN, or the saved login)
        self.offline = constants.is_offline_mode()
        self.api = HfApi(endpoint=self.endpoint, token=token)

    # -- errors ---------------------------------------------------------------------------------------

    def _explain(self, ref: HubRef, exc: Exception) -> HubError:
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        what = ref.text
        if isinstance(exc, GatedRepoError):
            return HubError(
                f"{what}: {ref.repo} is gated: accept its terms on the hub and set HF_TOKEN to a token with access"
            )
        if isinstance(exc, RepositoryNotFoundError):
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                return HubError(f"{what}: {ref.repo} needs a token with access (HTTP {status}); set HF_TOKEN")
            return HubError(
                f"{what}: no repository {ref.repo} on {self.endpoint} (or it is private: set HF_TOKEN)"
            )
        if isinstance(exc, RevisionNotFoundError):
            return HubError(f"{what}: {ref.repo} has no revision {ref.revision}")
        if isinstance(exc, OfflineModeIsEnabled):
            return HubError(f"{what}: not in the cache {self.cache}, and HF_HUB_OFFLINE is set")
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else "?"
            return HubError(f"{what}: the hub answered HTTP {status}: {str(exc).splitlines()[0]}")
        if isinstance(exc, (httpx2.HTTPError, OSError)):
            return HubError(f"{what}: cannot reach {self.endpoint}: {type(exc).__name__}: {exc}")
        return HubError(f"{what}: {type(exc).__name__}: {exc}")

    def _explain_status(self, ref: HubRef, status: int, code: str) -> HubError:
        """An HTTP error on the bulk transfer (which does not go through huggingface_hub's client)."""
        if status in (401, 403):
            return HubError(
                f"{ref.text}: the hub refused the file (HTTP {status} {code}); set HF_TOKEN to a token with access"
            )
        if status == 404:
            return HubError(f"{ref.text}: the file is gone from the hub (HTTP 404 {code})")
        return HubError(f"{ref.text}: the hub answered HTTP {status} {code}".rstrip())

    # -- metadata -------------------------------------------------------------------------------------

    def describe(self, ref: HubRef, timeout: float = 30.0) -> RemoteModel:
        """Files, sizes, checksums and the model's shape, from the hub's metadata and a ranged read of
        the head of the (first) file. No weight is fetched."""
        if self.offline:
            raise HubError(f"{ref.text}: not in the cache {self.cache}, and HF_HUB_OFFLINE is set")
        try:
            info = self.api.model_info(ref.repo, revision=ref.revision, files_metadata=True, timeout=timeout)
        except Exception as exc:
            raise self._explain(ref, exc) from None
        siblings = {s.rfilename: s for s in info.siblings or ()}
        try:
            if ref.filename:
                chosen = files_for_name(siblings, ref.filename)
            else:
                chosen = files_for_quant(siblings, ref.quant)
        except FileChoiceError as exc:
            raise HubError(f"{ref.text}: {exc}") from None
        files = []
        for path in chosen:
            s = siblings[path]
            if s.lfs is None or s.size is None:
                raise HubError(f"{ref.text}: {path} has no LFS checksum on the hub, so it cannot be verified")
            files.append(RemoteFile(path=path, size=int(s.size), sha256=s.lfs.sha256))
        commit = info.sha or ref.revision
        model = RemoteModel(ref=ref, commit=commit, files=tuple(files), shape=None)
        return RemoteModel(ref=ref, commit=commit, files=model.files, shape=self._shape(model, timeout))

    def _url(self, model: RemoteModel, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(model.ref.repo, path, revision=model.commit, endpoint=self.endpoint)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        from huggingface_hub.utils._headers import build_hf_headers

        return build_hf_headers(token=self.token, headers=extra)

    def _shape(self, model: RemoteModel, timeout: float) -> ModelShape | None:
        """The shape from the first bytes of the first file; None when the header cannot be read
        (then only the weights are counted)."""
        from huggingface_hub import get_session, hf_raise_for_status

        first = model.files[0]
        want = REMOTE_HEAD_BYTES
        while True:
            want = min(want, first.size)
            headers = self._headers({"Range": f"bytes=0-{want - 1}"})
            try:
                response = get_session().get(
                    self._url(model, first.path), headers=headers, follow_redirects=True, timeout=timeout
                )
                hf_raise_for_status(response)
            except Exception as exc:
                raise self._explain(model.ref, exc) from None
            head = response.content[:want]
            try:
                return model_shape(head)
            except NeedMoreBytes:
                if want >= first.size or want >= MAX_HEAD_BYTES:
                    return None
                want *= 4
            except GGUFError:
                return None

    # -- the cache ------------------------------------------------------------------------------------

    def cached(self, ref: HubRef, stop: threading.Event | None = None) -> Path | None:
        """The local path of the (first) file of a reference when all its files are in the cache and
        whole, without asking the network; None otherwise. A blob whose bytes no longer match its
        checksum is removed, and HubError says so."""
        files = self.cached_files(ref, stop)
        return files[0] if files else None

    def cached_files(self, ref: HubRef, stop: threading.Event | None = None) -> tuple[Path, ...]:
        """Every file of a reference in the cache (see :meth:`cached`); empty when any is missing."""
        folder = _repo_folder(self.cache, ref.repo)
        ref_file = folder / "refs" / ref.revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else ref.revision
        snapshot = folder / "snapshots" / commit
        if not snapshot.is_dir():
            return ()
        listing = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
        try:
            chosen = (
                files_for_name(listing, ref.filename) if ref.filename else files_for_quant(listing, ref.quant)
            )
        except FileChoiceError:
            return ()
        for path in chosen:
            self._check_blob(ref, snapshot / path, stop)
        return tuple(snapshot / path for path in chosen)

    def _check_blob(self, ref: HubRef, link: Path, stop: threading.Event | None) -> None:
        """A cached file is its blob, named by its sha256: check the bytes once, and again whenever
        the blob's size or modification time changes."""
        blob = link.resolve()
        stat = blob.stat()
        stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        marker = blob.with_name(blob.name + VERIFIED)
        if marker.is_file() and marker.read_text() == stamp:
            return
        if _sha256_of(blob, stop) != blob.name:
            blob.unlink()
            link.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            raise HubError(f"{ref.text}: the cached {link.name} did not match its checksum; it was removed")
        marker.write_text(stamp)

    # -- fetching -------------------------------------------------------------------------------------

    def fetch(
        self,
        model: RemoteModel,
        progress: Callable[[int, int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Path:
        """Every file of the model into the cache, continuing partial downloads, each verified;
        returns the path of the first file. ``progress(done, total)`` is called as bytes arrive."""
        folder = _repo_folder(self.cache, model.ref.repo)
        blobs = folder / "blobs"
        snapshot = folder / "snapshots" / model.commit
        blobs.mkdir(parents=True, exist_ok=True)
        total = model.size_bytes
        done_before = 0
        for remote in model.files:
            blob = blobs / remote.sha256
            if not blob.is_file():
                self._fetch_blob(model, remote, blob, done_before, total, progress, stop)
            link = snapshot / remote.path
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink() and not link.exists():
                link.symlink_to(os.path.relpath(blob, link.parent))
            done_before += remote.size
        if model.ref.revision != model.commit:
            refs = folder / "refs"
            refs.mkdir(exist_ok=True)
            (refs / model.ref.revision).write_text(model.commit)
        return snapshot / model.files[0].path

    def _receive(
        self,
        model: RemoteModel,
        remote: RemoteFile,
        partial: Path,
        have: int,
        digest: hashlib._Hash,
        progress_base: tuple[int, int],
        progress: Callable[[int, int], None] | None,
        stop: threading.Event | None,
    ) -> tuple[int, hashlib._Hash]:
        """Append the rest of ``remote`` from byte ``have`` to ``partial``, hashing on a second thread
        (:class:`BackgroundSha256`); returns the bytes now in ``partial`` and their digest."""
        # Identity: the bytes hashed are the bytes stored; raw reads pass the pieces through as they
        # come (re-chunking them to 1 MiB cost a third of the throughput, bench_download).
        wanted = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
        request = urllib.request.Request(self._url(model, remote.path))
        for key, value in self._headers(wanted).items():
            # The token goes to the hub only, not to the storage it redirects to (as huggingface_hub).
            if key.lower() == "authorization":
                request.add_unredirected_header(key, value)
            else:
                request.add_header(key, value)
        done_before, total = progress_base
        try:
            with urllib.request.urlopen(request, timeout=60.0) as response:
                if have and response.status != 206:  # the server ignored the range: start over
                    have, digest = 0, hashlib.sha256()
                with BackgroundSha256(digest) as hashing, partial.open("ab" if have else "wb") as out:
                    while data := response.read1(CHUNK):
                        if stop is not None and stop.is_set():
                            raise DownloadStopped()
                        out.write(data)
                        hashing.update(data)
                        have += len(data)
                        if progress is not None:
                            progress(done_before + have, total)
        except urllib.error.HTTPError as exc:
            raise self._explain_status(model.ref, exc.code, exc.headers.get("X-Error-Code", "")) from None
        except (DownloadStopped, HubError):
            raise
        except Exception as exc:
            raise self._explain(model.ref, exc) from None
        return have, digest

    def _fetch_blob(
        self,
        model: RemoteModel,
        remote: RemoteFile,
        blob: Path,
        done_before: int,
        total: int,
        progress: Callable[[int, int], None] | None,
        stop: threading.Event | None,
    ) -> None:
        partial = blob.with_name(blob.name + PARTIAL)
        digest = hashlib.sha256()
        have = partial.stat().st_size if partial.exists() else 0
        if have > remote.size:
            partial.unlink()
            have = 0
        if have:
            with partial.open("rb") as f:  # the bytes already here count toward the checksum
                while block := f.read(CHUNK * 8):
                    digest.update(block)
        if have < remote.size:
            have, digest = self._receive(model, remote, partial, have, digest, (done_before, total), progress, stop)
        if have < remote.size:  # the connection ended early: keep what came, the next try continues
            raise HubError(
                f"{model.ref.text}: the transfer of {remote.path} stopped at {have} of {remote.size} bytes "
                f"(cannot reach the rest now); it continues from there next time"
            )
        if have != remote.size or digest.hexdigest() != remote.sha256:
            partial.unlink(missing_ok=True)
            raise HubError(
                f"{model.ref.text}: {remote.path} came with {have} bytes and checksum {digest.hexdigest()[:12]}, "
                f"expected {remote.size} bytes and {remote.sha256[:12]}; the partial file was removed"
            )
        os.replace(partial, blob)
        stat = blob.stat()
        blob.with_name(blob.name + VERIFIED).write_text(f"{stat.st_size} {stat.st_mtime_ns}")
