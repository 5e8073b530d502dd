#!/usr/bin/env bash
# Installs what Stoker's tests and benchmarks need on a fresh Debian machine with Python >= 3.10:
# Debian packages (prometheus with promtool, prometheus-alertmanager with amtool,
# prometheus-node-exporter, victoria-metrics with vmagent and vmalert, wrk, openssl,
# python3-venv; for the .deb: dpkg-dev, binutils, lintian), then .venv with the package and
# its test dependencies, and .venv-lowest, the same with the lowest nvidia-ml-py that
# pyproject.toml allows (scripts/test.sh runs the GPU tests on it). Safe to run again: it
# installs only what is missing, and stops only the daemons of the packages it installed.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
need() { command -v "$1" >/dev/null || apt_packages+=("$2"); }
need prometheus prometheus
need promtool prometheus
need prometheus-alertmanager prometheus-alertmanager
need amtool prometheus-alertmanager
need prometheus-node-exporter prometheus-node-exporter
need victoria-metrics victoria-metrics
need vmagent victoria-metrics
need vmalert victoria-metrics
need wrk wrk
need openssl openssl
need systemd-analyze systemd
need dpkg-deb dpkg
need dpkg-shlibdeps dpkg-dev
need strip binutils
need lintian lintian
need man man-db
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null || apt_packages+=(python3 python3-venv)
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
  # Debian starts each daemon it installs; the tests start their own on loopback. Only the
  # services of packages installed now are stopped: one the user already runs stays up.
  new_services=()
  for svc in prometheus prometheus-alertmanager prometheus-node-exporter victoria-metrics; do
    case " ${apt_packages[*]} " in *" $svc "*) installed "$svc" || new_services+=("$svc") ;; esac
  done
  echo "installing Debian packages: ${apt_packages[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  for svc in "${new_services[@]}"; do
    installed "$svc" && { $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true; }
  done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

# The lowest nvidia-ml-py the pin allows, beside the package: the GPU tests run on it too.
lowest=$(sed -n 's/.*"nvidia-ml-py>=\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -x .venv-lowest/bin/python ] || python3 -m venv .venv-lowest
.venv-lowest/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-lowest/bin/python -m pip install -q -e '.[test]' "nvidia-ml-py==$lowest"
