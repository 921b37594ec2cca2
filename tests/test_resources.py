"""VRAM detection: config override first, then NVML, then a share of system RAM."""

from __future__ import annotations

import sys
import types
from pathlib import Path

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


def _nvidia_gpus_visible() -> bool:
    """Seen without NVML: the driver is loaded and there is a GPU device node."""
    return Path("/proc/driver/nvidia/version").exists() and any(Path("/dev").glob("nvidia[0-9]*"))


def test_nvml_answers_what_this_machine_has() -> None:
    total = resources.nvml_total_bytes()
    if _nvidia_gpus_visible():
        assert isinstance(total, int) and total > 0, total
    else:
        assert total is None, "no NVIDIA driver or GPU here: no VRAM from NVML"


class FakeNvml(types.ModuleType):
    """Just the pynvml calls nvml_total_bytes makes (with their names), for GPUs of these sizes."""

    class NVMLError(Exception):
        pass

    def __init__(self, sizes: list[int], fail_at: str = "") -> None:
        super().__init__("pynvml")
        self.sizes = sizes
        self.fail_at = fail_at
        self.shutdowns = 0

    def _maybe_fail(self, call: str) -> None:
        if call == self.fail_at:
            raise self.NVMLError(call)

    def nvmlInit(self) -> None:
        self._maybe_fail("init")

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._maybe_fail("count")
        return len(self.sizes)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        self._maybe_fail("memory")
        return types.SimpleNamespace(total=self.sizes[handle])


def test_nvml_total_is_the_sum_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([80 * GIB, 40 * GIB])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert resources.nvml_total_bytes() == 120 * GIB
    assert fake.shutdowns == 1


@pytest.mark.parametrize(
    ("sizes", "fail_at", "shutdowns"),
    [([], "", 1), ([GIB], "init", 0), ([GIB], "count", 1), ([GIB], "memory", 1)],
    ids=["no-gpu", "no-driver", "count-fails", "memory-fails"],
)
def test_nvml_without_a_usable_gpu_is_none(
    monkeypatch: pytest.MonkeyPatch, sizes: list[int], fail_at: str, shutdowns: int
) -> None:
    fake = FakeNvml(sizes, fail_at)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert resources.nvml_total_bytes() is None
    assert fake.shutdowns == shutdowns, "NVML is shut down whenever it was initialised"


def test_nvml_without_pynvml_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert resources.nvml_total_bytes() is None
