"""Log files: private to the owner's group, and rotated before they fill the disk - the node's own
log by rename, a llama.cpp child's by copy and truncate while the child keeps appending."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from meshllm.logfiles import LOG_FILE_MODE, RotatingLogFile, copy_truncate, open_log_for_append
from meshllm.logsetup import close_logger, make_logger
from tests.support import wait_until


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_log_files_are_created_0640_and_narrowed_when_wider(tmp_path: Path) -> None:
    fresh = tmp_path / "logs" / "node.log"
    with open_log_for_append(fresh) as f:
        f.write(b"one\n")
    assert mode(fresh) == LOG_FILE_MODE == 0o640
    wide = tmp_path / "old.log"
    wide.write_bytes(b"before\n")
    wide.chmod(0o666)
    with open_log_for_append(wide) as f:
        assert f.tell() == len(b"before\n")
        f.write(b"after\n")
    assert mode(wide) == 0o640
    assert wide.read_bytes() == b"before\nafter\n"


def test_the_nodes_log_rotates_by_rename_keeping_three(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    log = RotatingLogFile(path, max_bytes=100, keep=3)
    for i in range(40):
        log.write(f"line {i:02d} " + "x" * 20 + "\n")
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log", "node.log.1", "node.log.2", "node.log.3"]
    assert all(p.stat().st_size <= 100 + 30 for p in tmp_path.iterdir())
    assert all(mode(p) == 0o640 for p in tmp_path.iterdir())
    newest = (path.with_name("node.log.1").read_text() + path.read_text()).splitlines()
    assert newest[-1].startswith("line 39") and [int(x.split()[1]) for x in newest] == sorted(
        int(x.split()[1]) for x in newest
    ), "the newest lines, in order, across the rotation"


def test_make_logger_writes_a_rotating_file(tmp_path: Path) -> None:
    logger = make_logger("n", file=tmp_path / "node.log", stream=open(os.devnull, "w"))  # noqa: SIM115
    logger.info("hello", x=1)
    close_logger(logger)
    assert '"event": "hello"' in (tmp_path / "node.log").read_text()
    assert mode(tmp_path / "node.log") == 0o640


def test_a_childs_log_is_copied_and_truncated_while_it_keeps_writing(tmp_path: Path) -> None:
    path = tmp_path / "server_m.log"
    writer = subprocess.Popen(
        [sys.executable, "-u", "-c", "import sys\nfor line in sys.stdin: print(line, end='')"],
        stdin=subprocess.PIPE,
        stdout=open_log_for_append(path),
        text=True,
    )
    assert writer.stdin is not None
    try:
        writer.stdin.write("a" * 99 + "\n")
        writer.stdin.flush()
        wait_until(lambda: path.stat().st_size == 100, 10, what="the child's first line")
        assert not copy_truncate(path, max_bytes=101), "under the limit: left alone"
        assert copy_truncate(path, max_bytes=100)
        assert path.stat().st_size == 0 and path.with_name("server_m.log.1").read_text() == "a" * 99 + "\n"
        writer.stdin.write("after\n")
        writer.stdin.flush()
        # O_APPEND: the child's next write lands at the start of the emptied file, no hole before it.
        wait_until(lambda: path.read_bytes() == b"after\n", 10, what="the child's next line")
    finally:
        writer.stdin.close()
        writer.wait(10)
