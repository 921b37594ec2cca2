"""VRAM detection: config override first, then NVML, then a share of system RAM."""

from __future__ import annotations

import psutil
import pytest

from meshllm.models import capacity as resources
from meshllm.models.capacity import GIB, RAM_SHARE, detect_vram


def test_config_override_wins() -> None:
    vram = detect_vram(2.5)
    assert vram.source == "config" and vram.bytes == int(2.5 * GIB)


def test_without_nvml_half_the_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "nvml_total_bytes", lambda: None)
    vram = detect_vram(None)
    assert vram.source == "system-ram"
    assert vram.bytes == int(psutil.virtual_memory().total * RAM_SHARE)


def test_nvml_total_when_a_gpu_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "nvml_total_bytes", lambda: 80 * GIB)
    assert detect_vram(None) == resources.Vram(80 * GIB, "nvml")


def test_nvml_absent_on_this_machine_is_not_an_error() -> None:
    total = resources.nvml_total_bytes()  # no driver here: None; on a GPU machine: a positive size
    assert total is None or total > 0
