"""Shared fixtures: in-process nodes and node processes, each cleaned up even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.actor_dummies import Harness
from tests.support import NodeFactory, ProcessFactory


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessFactory]:
    factory = ProcessFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama GGUF (loads in milliseconds), named ``tiny``."""
    from tests.tinymodel import tiny_model

    folder = tmp_path_factory.mktemp("models")
    return tiny_model(folder).rename(folder / "tiny.gguf")


@pytest.fixture(scope="session")
def two_tiny_models(tiny_gguf: Path) -> tuple[Path, Path]:
    """Two distinct model files (``tiny-a``, ``tiny-b``) for multi-model tests."""
    import shutil

    a = tiny_gguf.parent / "tiny-a.gguf"
    b = tiny_gguf.parent / "tiny-b.gguf"
    for path in (a, b):
        if not path.exists():
            shutil.copyfile(tiny_gguf, path)
    return a, b


@pytest.fixture
def h() -> Iterator[Harness]:
    """A single-actor test's harness (tests/actor_dummies.py): dummies, log capture, clean stop."""
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium for one test of the console page (tests/browser.py)."""
    from tests.browser import have_browser, start_browser

    if not have_browser():  # the test command installs them; a missing browser is a failure, not a skip
        pytest.fail("no /usr/bin/chromium or /usr/bin/chromedriver: run scripts/install-browser.sh (as root)")
    browser = start_browser(tmp_path / "chromium-profile")
    try:
        yield browser
    finally:
        browser.quit()
