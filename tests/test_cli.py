"""The command line a user meets first: help, invite, config errors, log formats and files."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

from meshllm.wire.invite import InviteToken
from tests.support import ProcessFactory, wait_until, write_config


def meshllm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_starting_a_node_or_a_command_does_not_import_the_hub_client() -> None:
    """huggingface_hub (with httpx2 and trio) takes ~0.5 s to import: paid only by what names a hub
    model, not by every node start and every ``meshllm`` command."""
    hub = "('huggingface_hub', 'httpx2')"
    code = f"import sys, meshllm.cli, meshllm.node; print(sorted(m for m in sys.modules if m.startswith({hub})))"
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout


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
    # The default: a client token for a day, without the mesh secret.
    assert token.grant.role == "client" and token.secret == b""
    assert 86400 - 60 <= token.grant.expires_at - time.time() <= 86400
    again = InviteToken.decode(meshllm("invite", "--config", str(config), "--role", "active").stdout.strip())
    # Same key and mesh from the data dir; a new token id each time; the secret only for active.
    assert (again.node_id, again.mesh_id, again.authority) == (token.node_id, token.mesh_id, token.authority)
    assert again.grant.role == "active" and len(again.secret) == 32
    assert again.grant.token_id != token.grant.token_id
    week = InviteToken.decode(meshllm("invite", "-c", str(config), "--role", "standby", "--ttl", "7d").stdout)
    assert week.grant.role == "standby" and 7 * 86400 - 60 <= week.grant.expires_at - time.time() <= 7 * 86400
    forever = InviteToken.decode(meshllm("invite", "-c", str(config), "--ttl", "never").stdout)
    assert forever.grant.expires_at == 0
    bad = meshllm("invite", "-c", str(config), "--ttl", "soon")
    assert bad.returncode == 2 and "bad ttl" in bad.stderr


def test_invite_for_a_node_on_port_zero_reads_its_running_addresses(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    config = write_config(tmp_path, "a")
    before = meshllm("invite", "--config", str(config))
    assert before.returncode == 1 and "start it first" in before.stderr
    a = procs.start("a")
    started = a.started
    token = InviteToken.decode(meshllm("invite", "--config", str(config)).stdout)
    assert token.addrs == tuple(started["addrs"]) and token.node_id == a.node_id
    # The running node logs no token, only a fingerprint of its mesh and how to get one.
    text = a.log_path.read_text()
    invite_line = a.wait_event("mesh.invite", 10)
    assert "token" not in invite_line and "meshllm invite" in invite_line["hint"]
    assert token.encode() not in text and token.authority.hex() not in text
    assert stat.S_IMODE((tmp_path / "a" / "mesh.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a" / "node.key").stat().st_mode) == 0o600


def test_a_node_without_the_secret_cannot_invite(procs: ProcessFactory, tmp_path: Path) -> None:
    a = procs.start("a")
    config = write_config(tmp_path, "c", join=(a.token_for("client"),), node_extra='role = "client"')
    procs.start("c").wait_event("node.started", 30)
    out = meshllm("invite", "--config", str(config))
    assert out.returncode == 1 and "does not hold the mesh secret" in out.stderr


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
