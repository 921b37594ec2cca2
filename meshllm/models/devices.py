"""The GPUs this node has, seen two ways: by the NVIDIA driver (NVML, through ``pynvml``) and by the
llama.cpp build that would run the model (``llama-server --list-devices``).

NVML knows every NVIDIA GPU in the machine, exactly (bytes, UUIDs), whether or not the binaries can use
it. :func:`nvml_gpus` narrows that to what a CUDA program started from this environment sees, in the
order it sees them, by reading ``CUDA_VISIBLE_DEVICES`` the way the CUDA runtime does.

llama.cpp knows what its backends can use: a CPU-only build lists no GPU even on a GPU machine.
:func:`list_llama_devices` runs the binary and :func:`parse_list_devices` reads what it prints, which is
one ``printf`` in llama.cpp's ``common/arg.cpp`` (the ``--list-devices`` option)::

    printf("Available devices:\\n");
    if (devices.empty()) { printf("  (none)\\n"); }          // newer builds only
    for (auto * dev : devices)                              // every device that is not the CPU
        printf("  %s: %s (%zu MiB, %zu MiB free)\\n", ggml_backend_dev_name(dev),
               ggml_backend_dev_description(dev), total / 1024 / 1024, free / 1024 / 1024);

The CUDA backend names its devices ``CUDA0``, ``CUDA1``, ... in CUDA's enumeration order and describes
them with ``cudaDeviceProp.name`` (the same string NVML gives), so ``CUDAi`` is the i-th GPU of
:func:`nvml_gpus`. Other backends print ``Vulkan0``, ``ROCm0``, ``MTL0``, ``SYCL0``; ``BLAS`` (no memory)
and ``RPC[host:port]`` devices are listed too but are not GPUs of this node.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
LIST_DEVICES_TIMEOUT_S = 5.0
"""How long ``llama-server --list-devices`` may take (it initialises every backend, CUDA included)."""

CUDA_BACKEND = "CUDA"
NON_GPU_BACKENDS = frozenset({"CPU", "BLAS", "RPC"})
"""Backends whose listed devices are not GPUs of this node (``RPC[...]`` devices are other machines)."""


@dataclass(frozen=True)
class GpuMemory:
    """One GPU the model's backend can use, with its memory in bytes.

    ``index`` is the driver's number for the GPU (NVML's, the one ``nvidia-smi`` shows; a MIG instance
    has its parent's), or, for a GPU only llama.cpp reports (no NVML: ROCm, Vulkan, Metal), its place
    among the GPUs of the device list. ``uuid`` is NVML's (``GPU-...`` or ``MIG-...``), ``None`` without
    NVML. ``device`` is llama.cpp's name for it (``CUDA0``) when the device list was read.
    """

    index: int
    uuid: str | None
    name: str
    total_bytes: int
    free_bytes: int
    device: str | None = None


# ---------------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES


@dataclass(frozen=True)
class _NvmlDevice:
    """What NVML says about one GPU or MIG instance, with the handle to ask it more."""

    index: int
    uuid: str
    handle: Any


_ORDINAL = re.compile(r"\s*([+-]?\d+)")


def _strtoul(entry: str) -> int:
    """The number an entry starts with, as C's ``strtoul`` reads it (``"1gpu"`` is 1); -1 if none."""
    match = _ORDINAL.match(entry)
    return int(match.group(1)) if match else -1


def visible_order(spec: str | None, uuids: Sequence[str], mig_uuids: Sequence[str] = ()) -> list[str]:
    """The UUIDs a CUDA program sees, in its order, given ``CUDA_VISIBLE_DEVICES`` (``spec``).

    ``uuids`` are the GPUs in NVML's index order, ``mig_uuids`` the MIG instances. Read as the CUDA
    runtime reads it (its documentation, and PyTorch's ``torch.cuda._parse_visible_devices``, which
    mirrors it): unset means every GPU; otherwise a comma-separated list of ordinals (each read like
    ``strtoul``) or of UUIDs, ``GPU-...`` or ``MIG-...``, each possibly shortened to a prefix that names
    one device only (``mig_uuids`` may hold the old ``MIG-GPU-<uuid>/<gi>/<ci>`` spelling as well).
    The first entry that names no device (``-1``, an out-of-range ordinal, an unknown or ambiguous
    UUID, ``NoDevFiles``, an empty string) ends the list there; a device named twice leaves none
    visible. Whether the list holds ordinals or UUIDs is decided by its first entry.

    Ordinals are taken as NVML's indices (PCI bus order). CUDA's own order is fastest first unless
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; the two agree on machines whose GPUs are all alike.
    """
    if spec is None:
        return list(uuids)
    entries = spec.split(",")
    chosen: list[str] = []
    for prefix, pool in (("GPU-", uuids), ("MIG-", mig_uuids)):
        if spec.strip().startswith(prefix):
            for raw in entries:
                entry = raw.strip()
                if not entry.startswith(prefix):
                    break
                found = [entry] if entry in pool else [u for u in pool if u.startswith(entry)]
                if len(found) != 1:
                    break
                if found[0] in chosen:
                    return []
                chosen.append(found[0])
            return chosen
    for raw in entries:
        ordinal = _strtoul(raw)
        if ordinal < 0 or ordinal >= len(uuids):
            break
        if uuids[ordinal] in chosen:
            return []
        chosen.append(uuids[ordinal])
    return chosen


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_devices(pynvml: Any, with_mig: bool) -> tuple[list[_NvmlDevice], list[_NvmlDevice]]:
    """Every GPU NVML counts, and (when asked) every MIG instance on them, with legacy aliases."""
    gpus: list[_NvmlDevice] = []
    migs: list[_NvmlDevice] = []
    for i in range(int(pynvml.nvmlDeviceGetCount())):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        gpus.append(_NvmlDevice(i, uuid, handle))
        if with_mig:
            migs.extend(_mig_devices(pynvml, i, uuid, handle))
    return gpus, migs


def _mig_devices(pynvml: Any, index: int, gpu_uuid: str, handle: Any) -> list[_NvmlDevice]:
    """The MIG instances of one GPU: none when it has MIG off, or NVML cannot say."""
    found: list[_NvmlDevice] = []
    try:
        slots = int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except (pynvml.NVMLError, AttributeError):
        return found
    for slot in range(slots):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
        except pynvml.NVMLError:
            continue  # an empty slot
        found.append(_NvmlDevice(index, uuid, mig))
        try:  # the old spelling CUDA still accepts: MIG-GPU-<uuid>/<GPU instance>/<compute instance>
            gi = int(pynvml.nvmlDeviceGetGpuInstanceId(mig))
            ci = int(pynvml.nvmlDeviceGetComputeInstanceId(mig))
        except (pynvml.NVMLError, AttributeError):
            continue
        found.append(_NvmlDevice(index, f"MIG-{gpu_uuid}/{gi}/{ci}", mig))
    return found


def nvml_gpus(environ: Mapping[str, str] | None = None) -> tuple[GpuMemory, ...]:
    """The NVIDIA GPUs a CUDA program started with ``environ`` (default: this process's) would see.

    Empty without ``pynvml``, without a driver, or with no GPU visible; NVML errors count as "no GPU".
    """
    env = os.environ if environ is None else environ
    spec = env.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return ()
    try:
        with_mig = spec is not None and spec.strip().startswith("MIG-")
        gpus, migs = _nvml_devices(pynvml, with_mig)
        by_uuid = {d.uuid: d for d in [*gpus, *migs]}
        order = visible_order(spec, [g.uuid for g in gpus], [m.uuid for m in migs])
        out: list[GpuMemory] = []
        for uuid in order:
            dev = by_uuid[uuid]
            memory = pynvml.nvmlDeviceGetMemoryInfo(dev.handle)
            out.append(
                GpuMemory(
                    index=dev.index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(dev.handle)),  # the current spelling, not an alias
                    name=_text(pynvml.nvmlDeviceGetName(dev.handle)),
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                )
            )
        return tuple(out)
    except pynvml.NVMLError:
        return ()
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


# ---------------------------------------------------------------------------------------------------
# llama-server --list-devices


class DeviceListError(RuntimeError):
    """``llama-server --list-devices`` could not be run, failed, or printed something unexpected."""


@dataclass(frozen=True)
class LlamaDevice:
    """One device a llama.cpp build lists: ``CUDA0: NVIDIA H200 (143771 MiB, 142839 MiB free)``.

    Memory is what llama.cpp printed, whole MiB rounded down, in bytes.
    """

    name: str
    description: str
    total_bytes: int
    free_bytes: int

    @property
    def backend(self) -> str:
        """The backend's part of the name: ``CUDA`` for ``CUDA0``, ``RPC`` for ``RPC[host:port]``."""
        return re.sub(r"(\d+|\[.*\])$", "", self.name)

    @property
    def is_gpu(self) -> bool:
        """A GPU of this machine: not the CPU, BLAS or a remote RPC server, and with memory."""
        return self.backend not in NON_GPU_BACKENDS and self.total_bytes > 0


_HEADER = "Available devices:"
_NONE = "(none)"
_DEVICE_LINE = re.compile(
    r"^\s+(?P<name>\S+): (?P<description>.*) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$"
)


def parse_list_devices(text: str) -> tuple[LlamaDevice, ...]:
    """The devices in the output of ``llama-server --list-devices`` (its stdout), in the order listed.

    Lines before the ``Available devices:`` header are skipped; after it, every non-blank line must be a
    device line or ``(none)``. Raises :class:`DeviceListError` otherwise, so that a changed format is
    noticed instead of read as "no GPU".
    """
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == _HEADER)
    except StopIteration:
        raise DeviceListError(f"no {_HEADER!r} line in the device list: {text[:200]!r}") from None
    devices: list[LlamaDevice] = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.strip() == _NONE:
            continue
        match = _DEVICE_LINE.match(line)
        if match is None:
            raise DeviceListError(f"unexpected line in the device list: {line!r}")
        devices.append(
            LlamaDevice(
                name=match["name"],
                description=match["description"].strip(),
                total_bytes=int(match["total"]) * MIB,
                free_bytes=int(match["free"]) * MIB,
            )
        )
    return tuple(devices)


def list_llama_devices(
    server_binary: Path,
    *,
    timeout_s: float = LIST_DEVICES_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> tuple[LlamaDevice, ...]:
    """Run ``server_binary --list-devices`` (killed after ``timeout_s``) and parse what it prints.

    Raises :class:`DeviceListError` when it cannot start, times out, exits non-zero or prints no list.
    """
    try:
        done = subprocess.run(
            [str(server_binary), "--list-devices"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            env=None if environ is None else dict(environ),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeviceListError(f"{server_binary} --list-devices took more than {timeout_s:g} s") from None
    except OSError as e:
        raise DeviceListError(f"{server_binary} --list-devices could not start: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-300:]
        raise DeviceListError(f"{server_binary} --list-devices exited with {done.returncode}: {tail}")
    return parse_list_devices(done.stdout)


def gpu_devices(devices: Sequence[LlamaDevice]) -> tuple[LlamaDevice, ...]:
    """The listed devices that are GPUs of this node, each physical GPU once.

    A build with two GPU backends (CUDA and Vulkan) lists one card under both; llama.cpp itself then
    uses it once. A device of a later backend is dropped when an earlier backend already listed a
    device with the same description that no other device of that later backend has matched.
    """
    kept: list[LlamaDevice] = []
    claimed: dict[str, list[str]] = {}  # backend -> descriptions of other backends it has matched
    for dev in devices:
        if not dev.is_gpu:
            continue
        taken = claimed.setdefault(dev.backend, [])
        earlier = [k.description for k in kept if k.backend != dev.backend]
        if earlier.count(dev.description) > taken.count(dev.description):
            taken.append(dev.description)
            continue
        kept.append(dev)
    return tuple(kept)


def cross_check(listed: Sequence[LlamaDevice], nvml: Sequence[GpuMemory]) -> tuple[GpuMemory, ...]:
    """The listed GPUs as :class:`GpuMemory`, NVML's numbers taken where NVML knows the same GPU.

    ``CUDAi`` is paired with the i-th visible NVML GPU when their names agree; then NVML's exact
    bytes, index and UUID are used. Otherwise the list's numbers stand (index = place in ``listed``).
    """
    out: list[GpuMemory] = []
    for place, dev in enumerate(listed):
        ordinal = _cuda_ordinal(dev.name)
        pair = nvml[ordinal] if ordinal is not None and ordinal < len(nvml) else None
        if pair is not None and pair.name.strip().lower() == dev.description.lower():
            out.append(replace(pair, device=dev.name))
        else:
            out.append(GpuMemory(place, None, dev.description, dev.total_bytes, dev.free_bytes, dev.name))
    return tuple(out)


def _cuda_ordinal(name: str) -> int | None:
    match = re.fullmatch(CUDA_BACKEND + r"(\d+)", name)
    return int(match.group(1)) if match else None
