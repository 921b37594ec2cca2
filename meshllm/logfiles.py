"""Log files on disk: created private to the owner's group, and kept from filling the disk.

A node runs for months; its own ``node.log`` and the logs of its llama.cpp children grow with every
request. The node's log is written by this process, so it is rotated the usual way (rename, reopen).
A child's log is written by the child through an inherited ``O_APPEND`` descriptor that this process
cannot reopen for it, so it is rotated by copy and truncate: the child's next write lands at the new
end of the emptied file (a line written between the copy and the truncation is lost, as with
logrotate's ``copytruncate``).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import IO

LOG_FILE_MODE = 0o640  # logs name peers, models and addresses: not for every user of the machine
LOG_MAX_BYTES = 64 << 20  # a file is rotated once it is this big ...
LOG_KEEP = 3  # ... and this many old ones are kept: path.1 (newest) .. path.3


def open_log_for_append(path: Path) -> IO[bytes]:
    """``path`` opened to append bytes, created (with its folder) as :data:`LOG_FILE_MODE`, and
    narrowed to it if an older file was created wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, LOG_FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) & ~LOG_FILE_MODE:
        os.fchmod(fd, LOG_FILE_MODE)
    return os.fdopen(fd, "ab")


def _shift_old(path: Path, keep: int) -> None:
    """path.(keep-1) -> path.keep, ..., path.1 -> path.2 (the oldest falls off)."""
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))


def copy_truncate(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> bool:
    """Rotate a log another process appends to, if it is at least ``max_bytes``: its content goes to
    ``path.1`` (older ones shift), then it is emptied in place. True when it was rotated."""
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    _shift_old(path, keep)
    first = path.with_name(f"{path.name}.1")
    shutil.copyfile(path, first)
    os.chmod(first, LOG_FILE_MODE)
    os.truncate(path, 0)
    return True


class RotatingLogFile(io.TextIOBase):
    """A text log this process writes, rotated by rename once it reaches ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._file = open_log_for_append(path)
        self._size = self._file.tell()

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        with self._lock:
            self._file.write(data)
            self._size += len(data)
            if self._size >= self.max_bytes and text.endswith("\n"):
                self._rotate()
        return len(text)

    def _rotate(self) -> None:
        self._file.close()
        _shift_old(self.path, self.keep)
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open_log_for_append(self.path)
        self._size = 0

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
        super().close()

    def writable(self) -> bool:
        return True
