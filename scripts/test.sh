#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine with Python >= 3.10,
# then runs the whole suite, the slow integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
command -v prometheus >/dev/null || apt_packages+=(prometheus)
command -v promtool >/dev/null || apt_packages+=(prometheus)
command -v prometheus-alertmanager >/dev/null || apt_packages+=(prometheus-alertmanager)
command -v prometheus-node-exporter >/dev/null || apt_packages+=(prometheus-node-exporter)
python3 -c "import ensurepip, venv" 2>/dev/null || apt_packages+=(python3-venv)
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${apt_packages[*]}"
  $sudo apt-get update -qq
  # the packages' own services are not wanted: tests start their own servers on loopback
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
