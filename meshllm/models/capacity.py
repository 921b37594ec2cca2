"""How much accelerator memory this node offers the mesh: NVML when there is an NVIDIA GPU, else the
config's ``vram_gb``, else a share of system RAM (llama.cpp then runs on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

GIB = 1024**3
RAM_SHARE = 0.5


@dataclass(frozen=True)
class Vram:
    bytes: int
    source: str  # "config", "nvml" or "system-ram"


def nvml_total_bytes() -> int | None:
    """Total memory of every NVIDIA GPU NVML sees, or None without a driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        total = 0
        for i in range(count):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            total += int(info.total)
        return total if count else None
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def detect_vram(override_gb: float | None) -> Vram:
    if override_gb is not None:
        return Vram(int(override_gb * GIB), "config")
    nvml = nvml_total_bytes()
    if nvml is not None:
        return Vram(nvml, "nvml")
    return Vram(int(psutil.virtual_memory().total * RAM_SHARE), "system-ram")
