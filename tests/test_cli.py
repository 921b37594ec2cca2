"""The command line a user meets first: help, invite, config errors, log formats and files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from meshllm.wire.invite import InviteToken
from tests.support import ProcessFactory, wait_until, write_config


def meshllm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_help_explains_every_command_and_option() -> None:
    top = meshllm("--help")
    assert top.returncode == 0 and "run" in top.stdout and "invite" in top.stdout
    run = meshllm("run", "--help")
    for option in ("--config", "--log-format", "--log-file", "--force-split", "--quic-listen"):
        assert option in run.stdout
    assert "[node] quic_listen" in run.stdout  # markup does not eat the section names


def test_invite_prints_a_token_for_the_configured_node(tmp_path: Path) -> None:
    config = tmp_path / "n.toml"
    config.write_text(f'[node]\nname = "n"\ndata_dir = "{tmp_path / "n"}"\nquic_listen = "127.0.0.1:9999"\n')
    out = meshllm("invite", "--config", str(config))
    assert out.returncode == 0, out.stderr
    token = InviteToken.decode(out.stdout.strip())
    assert token.addrs == ("127.0.0.1:9999",)
    again = InviteToken.decode(meshllm("invite", "--config", str(config)).stdout.strip())
    assert again == token  # same key and mesh from the data dir


def test_broken_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nnmae = "x"\n')
    out = meshllm("run", "--config", str(config))
    assert out.returncode == 2
    assert "node.nmae" in out.stderr and "node.name" in out.stderr
    missing = meshllm("run", "--config", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "absent.toml" in missing.stderr


def test_console_log_format_and_log_file(procs: ProcessFactory, tmp_path: Path) -> None:
    write_config(tmp_path, "a", extra='[log]\nformat = "console"\nfile = true\n')
    a = procs.start("a")
    log_file = tmp_path / "a" / "node.log"
    wait_until(lambda: log_file.exists() and "mesh.invite" in log_file.read_text(), 30, what="log file")
    stderr = a.log_path.read_text()
    assert "mesh.invite" in stderr and not stderr.lstrip().startswith("{")  # human format on stderr
    for line in stderr.splitlines():
        if "node.started" in line:
            assert "node=a" in line
    # the file gets the same records
    assert "node.started" in log_file.read_text()
