#!/usr/bin/env bash
# Install what the tests need (see bootstrap.sh; install-browser.sh adds headless Chromium for the
# console page's tests, install-netns-tools.sh iptables for the network-fault tests), then lint,
# type-check and run the whole test suite.
# Extra arguments go to pytest and run just that selection, serially (e.g. scripts/test.sh -k mesh -x).
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
if [ "$#" -gt 0 ]; then  # a chosen selection runs as asked, one test at a time
  echo "[test] pytest $*"
  exec "$py" -m pytest -p no:cacheprovider "$@"
fi
# Most tests wait on processes more than they compute: two at a time halve the wall time on 2 cores.
# The tests marked serial load the CPUs on purpose (floods, busy loops, the soak) or assert that no
# node is falsely declared dead under load: they run afterwards, alone.
echo "[test] pytest: the suite, two tests at a time"
"$py" -m pytest -p no:cacheprovider -n 2 --dist worksteal -m "not serial"
echo "[test] pytest: the tests that run alone"
exec "$py" -m pytest -p no:cacheprovider -m serial
