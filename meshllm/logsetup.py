"""Structured logs: one JSON object a line (``event``, ``node``, ``ts``, ``level``, fields) to stderr,
optionally also to a file in the data dir, or a human console format.

Each node gets its own wrapped logger (not structlog's global configuration), so several nodes in one
process - as tests run them - keep their own ``node`` field and their own files.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import structlog
from structlog.typing import Processor

from meshllm.logfiles import RotatingLogFile

Logger = structlog.typing.FilteringBoundLogger


class TextSink(Protocol):
    """Where rendered lines go: stderr, a test's capture, a rotating file."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class LineSink:
    """Writes each rendered line to every stream it holds, whole, from any thread."""

    def __init__(self, streams: list[TextSink]) -> None:
        self._streams = streams
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            for stream in self._streams:
                try:
                    stream.write(message + "\n")
                    stream.flush()
                except (ValueError, OSError):
                    pass  # a closed stream (interpreter shutdown) must not break the caller

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg

    def close_files(self) -> None:
        with self._lock:
            for stream in self._streams:
                if stream not in (sys.stderr, sys.stdout):
                    stream.close()
            self._streams = [s for s in self._streams if s in (sys.stderr, sys.stdout)]


LogTap = Callable[[Mapping[str, Any]], None]


def _tapped(tap: LogTap) -> Processor:
    """A processor that shows each record to ``tap`` (the console's timeline) and passes it on."""

    def process(logger: Any, method: str, event_dict: Any) -> Any:
        try:
            tap(event_dict)
        except Exception:
            pass  # the tap must never break logging
        return event_dict

    return process


def make_logger(
    node: str,
    fmt: str = "json",
    file: Path | None = None,
    stream: IO[str] | None = None,
    tap: LogTap | None = None,
) -> Logger:
    """A logger bound to ``node`` that renders as ``fmt`` ("json" or "console"); ``tap`` also sees
    every record (with its ``ts``) before it is rendered."""
    streams: list[TextSink] = [stream if stream is not None else sys.stderr]
    if file is not None:
        streams.append(RotatingLogFile(file))
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
        *([_tapped(tap)] if tap is not None else []),
        renderer,
    ]
    logger: Any = structlog.wrap_logger(
        LineSink(streams),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    bound: Logger = logger.bind(node=node)
    return bound


def close_logger(logger: Logger) -> None:
    """Close the files a logger writes to (stderr stays open)."""
    sink = getattr(logger, "_logger", None)
    if isinstance(sink, LineSink):
        sink.close_files()
