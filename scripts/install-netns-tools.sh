#!/usr/bin/env bash
# Install iptables for the network-fault tests (tests/test_netfaults.py: partitions and loss between
# node processes in network namespaces). iproute2's `ip` is already on these machines. Idempotent and
# quick when it is there; needs root (apt-get) only the first time. Delay needs nothing more: it is an
# iptables NFQUEUE rule (xt target, built into this kernel) and tests/netdelay.py, pure Python.
set -euo pipefail
log() { printf '[install-netns-tools] %s\n' "$*" >&2; }

if command -v iptables >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
  log "need root and apt-get to install iptables and iproute2 (the network-fault tests fail without them)"
  exit 0
fi
log "installing iptables and iproute2 (apt)"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q iptables iproute2
