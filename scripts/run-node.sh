#!/usr/bin/env bash
# Install what a node needs (see bootstrap.sh), then run one. Without arguments: the built-in default,
# a solo node serving SmolLM2-135M with its OpenAI API on http://127.0.0.1:9337/v1.
# Arguments go to `meshllm run` (e.g. scripts/run-node.sh --config config/worker.toml).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/meshllm" run "$@"
