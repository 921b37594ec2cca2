"""How much memory this node offers the mesh: what the backend that runs the model can use.

:func:`detect_capacity` decides, in this order:

1. ``[node] vram_gb`` in the config overrides everything (source ``"config"``);
2. a llama.cpp build whose ``llama-server --list-devices`` lists GPUs: the sum of those GPUs' memory,
   NVML's exact numbers where NVML knows the GPU (source ``"gpu"``);
3. a build that lists no GPU (CPU-only binaries) runs the model on the CPU, whatever GPUs the machine
   has: a share of system RAM (source ``"system-ram"``);
4. no binary (a node that serves nothing), or a device list that could not be read: NVML's GPUs
   (source ``"nvml"``), else the RAM share.

The GPUs NVML sees (``CUDA_VISIBLE_DEVICES`` honoured) are reported in every case for status. The
device list is read whenever there is a binary, the config's override included: besides the bytes it
says which backend runs the model (:attr:`Capacity.backend`, logged at start) and which GPUs the
Election offloads to (:attr:`Capacity.llama_gpus`). Nothing is logged here: :attr:`Capacity.list_error`
says why a device list was not used.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

from meshllm.models.devices import (
    LIST_DEVICES_TIMEOUT_S,
    DeviceListError,
    GpuMemory,
    LlamaDevice,
    cross_check,
    gpu_devices,
    list_llama_devices,
    nvml_gpus,
)

GIB = 1024**3
RAM_SHARE = 0.5


@dataclass(frozen=True)
class Capacity:
    """The memory this node offers, where the number came from, and the GPUs behind it.

    ``source`` is ``"config"``, ``"gpu"`` (the llama.cpp build's GPUs), ``"nvml"`` (no build asked)
    or ``"system-ram"``. ``gpus`` are the GPUs counted for ``"gpu"``; otherwise the ones NVML sees,
    reported for status only. ``list_error`` is why ``--list-devices`` gave nothing usable, if it failed.

    ``devices`` is everything the build listed (``None``: not read) and ``llama_gpus`` the GPUs among
    them, cross-checked with NVML: what llama.cpp will run on. Both are records of the same reading,
    left out of equality, which is about the capacity itself.
    """

    bytes: int
    source: str
    gpus: tuple[GpuMemory, ...] = ()
    list_error: str | None = None
    devices: tuple[LlamaDevice, ...] | None = field(default=None, compare=False)
    llama_gpus: tuple[GpuMemory, ...] = field(default=(), compare=False)

    @property
    def backend(self) -> str:
        """``cpu``, or the GPU backends of the listed GPUs (``cuda``), or ``unknown`` (list not read)."""
        if self.devices is None:
            return "unknown"
        found = dict.fromkeys(d.backend.lower() for d in self.llama_gpus_devices())
        return ",".join(found) or "cpu"

    def llama_gpus_devices(self) -> tuple[LlamaDevice, ...]:
        """The listed devices that are GPUs of this node (each card once)."""
        return gpu_devices(self.devices or ())


def ram_share_bytes() -> int:
    """The part of system RAM a CPU backend is offered."""
    return int(psutil.virtual_memory().total * RAM_SHARE)


def detect_capacity(
    override_gb: float | None,
    server_binary: Path | None,
    *,
    timeout_s: float = LIST_DEVICES_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> Capacity:
    """This node's capacity; see the module's docstring for the order of the rules.

    ``server_binary`` is the ``llama-server`` that would run the model (``None``: this node serves
    nothing). ``environ`` (default: this process's) is what that binary would run with; its
    ``CUDA_VISIBLE_DEVICES`` picks the GPUs for both NVML and llama.cpp.
    """
    nvml = nvml_gpus(environ)
    list_error: str | None = None
    devices: tuple[LlamaDevice, ...] | None = None
    if server_binary is not None:
        try:
            devices = list_llama_devices(server_binary, timeout_s=timeout_s, environ=environ)
        except DeviceListError as e:
            list_error = str(e)
    listed = gpu_devices(devices or ())
    gpus = cross_check(listed, nvml) if listed else ()
    if override_gb is not None:
        return Capacity(int(override_gb * GIB), "config", nvml, list_error, devices, gpus)
    if devices is not None:
        if not gpus:
            return Capacity(ram_share_bytes(), "system-ram", nvml, None, devices, gpus)
        return Capacity(sum(g.total_bytes for g in gpus), "gpu", gpus, None, devices, gpus)
    if nvml:
        return Capacity(sum(g.total_bytes for g in nvml), "nvml", nvml, list_error)
    return Capacity(ram_share_bytes(), "system-ram", (), list_error)


# ---------------------------------------------------------------------------------------------------
# The interface node.py uses until it moves to detect_capacity.


@dataclass(frozen=True)
class Vram:
    """The older answer: bytes and source only (``"config"``, ``"nvml"`` or ``"system-ram"``)."""

    bytes: int
    source: str


def nvml_total_bytes() -> int | None:
    """Total memory of every NVIDIA GPU NVML sees, ``CUDA_VISIBLE_DEVICES`` ignored (as ``nvidia-smi``
    counts), or ``None`` without a driver or GPU."""
    gpus = nvml_gpus({})
    return sum(g.total_bytes for g in gpus) if gpus else None


def detect_vram(override_gb: float | None) -> Vram:
    """:func:`detect_capacity` without a binary: the config's value, else NVML's GPUs, else RAM share."""
    capacity = detect_capacity(override_gb, None)
    return Vram(capacity.bytes, capacity.source)


# ---------------------------------------------------------------------------------------------------
# Free memory now, for status: the GPUs counted at start, their free bytes read again.


def with_free_now(gpus: tuple[GpuMemory, ...], now: tuple[GpuMemory, ...]) -> tuple[GpuMemory, ...]:
    """``gpus`` with each one's free bytes taken from ``now`` (a fresh NVML reading) where ``now``
    has the same GPU by UUID; the set of GPUs and their totals stay as counted at start."""
    free = {g.uuid: g.free_bytes for g in now if g.uuid is not None}
    return tuple(replace(g, free_bytes=free[g.uuid]) if g.uuid in free else g for g in gpus)


class GpuFreeMemory:
    """The node's GPUs with their free memory as NVML reads it now, at most once per ``max_age_s``.

    Capacity is decided once, at start; what is free changes as llama.cpp loads and unloads models,
    and ``/api/status`` shows it per GPU. Reading NVML costs an init and a shutdown, so a status
    poll every few hundred ms (the console's event stream) reuses the last reading.
    """

    def __init__(
        self,
        gpus: tuple[GpuMemory, ...],
        environ: Mapping[str, str] | None = None,
        max_age_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gpus = gpus
        self._environ = environ
        self._max_age_s = max_age_s
        self._clock = clock
        self._read_at = clock()  # the figures at hand were read at start
        self._lock = threading.Lock()

    def gpus(self) -> tuple[GpuMemory, ...]:
        with self._lock:
            if not any(g.uuid for g in self._gpus):
                return self._gpus  # nothing NVML knows: llama.cpp's figures from start are all there is
            now = self._clock()
            if now - self._read_at >= self._max_age_s:
                self._gpus = with_free_now(self._gpus, nvml_gpus(self._environ))
                self._read_at = now
            return self._gpus
