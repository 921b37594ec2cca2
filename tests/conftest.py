"""Shared fixtures: in-process nodes and node processes, each cleaned up even when a test fails."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
