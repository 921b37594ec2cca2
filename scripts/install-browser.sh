#!/usr/bin/env bash
# Install headless Chromium and its WebDriver for the console's browser tests (tests/test_console_page.py).
# Idempotent and quick when both are there; needs root (apt-get) only the first time.
set -euo pipefail
log() { printf '[install-browser] %s\n' "$*" >&2; }

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get here: install chromium and chromedriver yourself (the browser tests fail without them)"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    log "not root and no sudo: install chromium and chromium-driver yourself (the browser tests fail without them)"
    exit 0
  fi
fi
log "installing chromium and chromium-driver (apt)"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver
