"""Downloader actor: owns this node's hub models' download jobs and their progress.

For each hub model in ``[models] serve`` it first looks in the cache (offline, verified), and
otherwise asks the hub what the model needs - sizes, checksums and the KV-cache shape from a ranged
read of the file's head - and tells the Election (``ModelDescribed``). The Election decides, with the
node's memory budget and the peers it knows, whether this node needs the file; it answers with
``FetchModel`` or ``RefuseModel``. Fetches run on threads (one per model), resume where an earlier
run stopped, are verified against the hub's sha256, and end with ``ModelFetched`` to the Election.

Events: ``download.started``, ``download.progress`` (at most once a second), ``download.done``,
``download.failed`` (reason), ``download.refused`` (needed and available bytes, why),
``download.cached``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.models.gguf_shape import shape_of_file
from meshllm.models.hub import DownloadStopped, Hub, HubError, RemoteModel
from meshllm.models.refs import HubRef
from meshllm.serving.gguf_layout import GGUFError
from meshllm.wire.codec import Message
from meshllm.wire.messages import (
    DownloadProgressed,
    DownloadsReply,
    DownloadStatus,
    FetchModel,
    GetDownloads,
    ModelDescribed,
    ModelFetched,
    RefuseModel,
)

PROGRESS_EVERY_S = 1.0


@dataclass
class _Job:
    ref: HubRef
    status: DownloadStatus
    remote: RemoteModel | None = None
    started: float = 0.0
    resumed_at: int = -1  # bytes already there when this run's fetch began (for the rate)
    thread: threading.Thread | None = None


@dataclass
class _Reports:
    """What a worker thread tells the actor; calls after the actor stopped are dropped."""

    tell: Callable[[Message], None]
    stop: threading.Event = field(default_factory=threading.Event)


class Downloader(MsgpackActor):
    """Fetches this node's hub models when the Election says it needs them."""

    name = "downloader"

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        models: tuple[tuple[str, HubRef], ...],
        hub: Hub,
        context: int,
    ) -> None:
        super().__init__(directory, logger)
        self.hub = hub
        self.context = context
        self.jobs = {
            name: _Job(ref, DownloadStatus(model=name, ref=ref.text, state="resolving"))
            for name, ref in models
        }
        self.reports = _Reports(self.teller())

    def on_start(self) -> None:
        for name in self.jobs:
            self._spawn(name, self._resolve)

    def on_stop(self) -> None:
        super().on_stop()
        self.reports.stop.set()  # running fetches stop at their next chunk; partial files stay

    def _spawn(self, name: str, work: Callable[[str, _Job], None]) -> None:
        job = self.jobs[name]
        job.thread = threading.Thread(target=work, args=(name, job), name=f"download-{name}", daemon=True)
        job.thread.start()

    def _set(self, name: str, **changes: object) -> DownloadStatus:
        job = self.jobs[name]
        job.status = replace(job.status, **changes)  # type: ignore[arg-type]
        return job.status

    def _kv(self, path: Path) -> int:
        try:
            return shape_of_file(path).kv_cache_bytes(self.context)
        except (GGUFError, OSError):
            return 0

    # -- worker threads (they only read their job and tell the actor) ------------------------------------

    def _resolve(self, name: str, job: _Job) -> None:
        tell = self.reports.tell
        try:
            cached = self.hub.cached_files(job.ref, self.reports.stop)
        except HubError as exc:
            self.log.warning("download.corrupt", model=name, ref=job.ref.text, reason=str(exc))
            cached = ()
        except DownloadStopped:
            return
        if cached:
            size = sum(p.stat().st_size for p in cached)
            tell(ModelFetched(model=name, path=str(cached[0]), size_bytes=size, kv_bytes=self._kv(cached[0])))
            return
        try:
            remote = self.hub.describe(job.ref)
        except HubError as exc:
            tell(ModelDescribed(model=name, size_bytes=0, kv_bytes=0, error=str(exc)))
            return
        job.remote = remote  # read by the actor only after the message below
        kv = remote.shape.kv_cache_bytes(self.context) if remote.shape is not None else 0
        tell(ModelDescribed(model=name, size_bytes=remote.size_bytes, kv_bytes=kv))

    def _fetch(self, name: str, job: _Job) -> None:
        tell, remote = self.reports.tell, job.remote
        assert remote is not None
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done == total:
                last[0] = now
                tell(DownloadProgressed(model=name, done_bytes=done, total_bytes=total))

        try:
            path = self.hub.fetch(remote, progress, self.reports.stop)
        except DownloadStopped:
            return
        except HubError as exc:
            tell(ModelFetched(model=name, path="", size_bytes=0, kv_bytes=0, error=str(exc)))
            return
        kv = remote.shape.kv_cache_bytes(self.context) if remote.shape is not None else self._kv(path)
        tell(ModelFetched(model=name, path=str(path), size_bytes=remote.size_bytes, kv_bytes=kv))

    # -- messages ----------------------------------------------------------------------------------------

    @handles(ModelDescribed)
    def on_described(self, msg: ModelDescribed) -> None:
        if msg.model not in self.jobs:
            return
        if msg.error:
            self._set(msg.model, state="failed", reason=msg.error)
            self.log.error("download.failed", model=msg.model, reason=msg.error)
        else:
            self._set(msg.model, state="described", total_bytes=msg.size_bytes)
        self.tell("election", msg)

    @handles(FetchModel)
    def on_fetch(self, msg: FetchModel) -> None:
        job = self.jobs.get(msg.model)
        if job is None or job.remote is None or job.status.state in ("downloading", "done"):
            return
        job.started = time.monotonic()
        status = self._set(msg.model, state="downloading", reason="", needed_bytes=0, available_bytes=0)
        self.log.info("download.started", model=msg.model, ref=job.ref.text, total_bytes=status.total_bytes)
        self._spawn(msg.model, self._fetch)

    @handles(RefuseModel)
    def on_refuse(self, msg: RefuseModel) -> None:
        job = self.jobs.get(msg.model)
        if job is None or job.status.state in ("downloading", "done", "cached"):
            return
        before = job.status
        self._set(
            msg.model,
            state="refused",
            needed_bytes=msg.needed_bytes,
            available_bytes=msg.available_bytes,
            reason=msg.reason,
        )
        if (before.state, before.needed_bytes, before.available_bytes) != (
            "refused",
            msg.needed_bytes,
            msg.available_bytes,
        ):
            self.log.warning(
                "download.refused",
                model=msg.model,
                ref=job.ref.text,
                needed_bytes=msg.needed_bytes,
                available_bytes=msg.available_bytes,
                reason=msg.reason,
            )

    @handles(DownloadProgressed)
    def on_progress(self, msg: DownloadProgressed) -> None:
        job = self.jobs.get(msg.model)
        if job is None:
            return
        if job.resumed_at < 0:
            job.resumed_at = msg.done_bytes
        rate = (msg.done_bytes - job.resumed_at) / max(time.monotonic() - job.started, 1e-6)
        self._set(
            msg.model, done_bytes=msg.done_bytes, total_bytes=msg.total_bytes, rate_bytes_s=round(rate, 1)
        )
        self.log.info(
            "download.progress",
            model=msg.model,
            bytes=msg.done_bytes,
            total=msg.total_bytes,
            rate_bytes_s=round(rate),
        )

    @handles(ModelFetched)
    def on_fetched(self, msg: ModelFetched) -> None:
        job = self.jobs.get(msg.model)
        if job is None:
            return
        if msg.error:
            self._set(msg.model, state="failed", reason=msg.error)
            self.log.error("download.failed", model=msg.model, ref=job.ref.text, reason=msg.error)
        elif job.status.state == "resolving":
            self._set(msg.model, state="cached", done_bytes=msg.size_bytes, total_bytes=msg.size_bytes)
            self.log.info("download.cached", model=msg.model, ref=job.ref.text, path=msg.path)
        else:
            seconds = time.monotonic() - job.started
            self._set(msg.model, state="done", done_bytes=msg.size_bytes, total_bytes=msg.size_bytes)
            self.log.info(
                "download.done", model=msg.model, ref=job.ref.text, path=msg.path, seconds=round(seconds, 2)
            )
        self.tell("election", msg)

    @handles(GetDownloads)
    def on_get(self, msg: GetDownloads) -> DownloadsReply:
        return DownloadsReply(jobs=tuple(job.status for job in self.jobs.values()))
