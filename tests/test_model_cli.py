"""``meshllm download`` and ``meshllm models`` against a fake hub."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from meshllm.cli import app
from tests.fake_hub import FakeHub
from tests.fake_hub import fake_hub as fake_hub_fixture  # noqa: F401
from tests.test_hub import smollm2

REPO, FILE = "org/SmolLM2-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"


def config(tmp_path: Path, vram_gb: float) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nname = "cli"\ndata_dir = "{tmp_path / "data"}"\nvram_gb = {vram_gb}\n'
        f'[console]\nlisten = "127.0.0.1:9"\n'  # no node runs: the check counts this machine alone
        f'[models]\ncache_dir = "{tmp_path / "cache"}"\n'
    )
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_download_fetches_into_the_cache_then_finds_it(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_file(REPO, FILE, smollm2())
    cfg = str(config(tmp_path, 4.0))
    code, out, err = run("download", f"{REPO}:Q4_1", "--config", cfg)
    assert code == 0, err
    path = Path(out.strip())
    assert path.read_bytes() == smollm2().read_bytes()
    assert "downloaded" in err  # plain progress lines when not a terminal
    served = fake_hub.body_bytes_served(REPO, FILE)
    code, out, _ = run("download", f"hf://{REPO}/{FILE}", "--config", cfg)
    assert code == 0 and Path(out.strip()) == path
    assert fake_hub.body_bytes_served(REPO, FILE) == served  # from the cache, nothing fetched
    code, out, _ = run("models", "--config", cfg)
    assert code == 0 and f"{REPO}:{FILE}" in out and "smollm2-135m" in out


def test_download_refused_fetches_nothing_unless_forced(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_file(REPO, FILE, smollm2())
    cfg = str(config(tmp_path, 0.05))
    code, out, err = run("download", f"{REPO}:{FILE}", "--config", cfg)
    assert code == 3 and out == ""
    assert "refused" in err and "needed" in err and "--force" in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    code, out, err = run("download", f"{REPO}:{FILE}", "--config", cfg, "--force")
    assert code == 0, err
    assert Path(out.strip()).stat().st_size == smollm2().stat().st_size


def test_download_errors_exit_1_with_the_reason(fake_hub: FakeHub, tmp_path: Path) -> None:
    code, _, err = run("download", "org/nothing:Q4_K_M", "--config", str(config(tmp_path, 4.0)))
    assert code == 1 and "no repository org/nothing" in err
    code, _, err = run("download", "org/x:README.md", "--config", str(config(tmp_path, 4.0)))
    assert code == 1 and ".gguf" in err
