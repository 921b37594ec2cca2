#!/usr/bin/env bash
# Install what the tests need (see bootstrap.sh; install-browser.sh adds headless Chromium for the
# console page's tests, install-netns-tools.sh iptables for the network-fault tests), then lint,
# type-check and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k mesh -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
bash "$root/scripts/install-browser.sh"
bash "$root/scripts/install-netns-tools.sh"
cd "$root"
py="$root/.venv/bin/python"
echo "[test] ruff"
"$py" -m ruff check meshllm actors tests
echo "[test] mypy"
"$py" -m mypy
echo "[test] pytest"
exec "$py" -m pytest -p no:cacheprovider "$@"
