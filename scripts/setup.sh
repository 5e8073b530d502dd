#!/usr/bin/env bash
# Installs what Stoker's tests and benchmarks need on a fresh Debian machine with Python >= 3.10:
# Debian packages (prometheus with promtool, prometheus-alertmanager with amtool,
# prometheus-node-exporter, wrk, openssl, python3-venv), then .venv with the package and
# its test dependencies. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
need() { command -v "$1" >/dev/null || apt_packages+=("$2"); }
need prometheus prometheus
need promtool prometheus
need prometheus-alertmanager prometheus-alertmanager
need amtool prometheus-alertmanager
need prometheus-node-exporter prometheus-node-exporter
need wrk wrk
need openssl openssl
need systemd-analyze systemd
need dpkg-deb dpkg
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null || apt_packages+=(python3 python3-venv)
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${apt_packages[*]}"
  $sudo apt-get update -qq
  # Debian starts each daemon it installs; the tests start their own on loopback
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
