#!/usr/bin/env bash
# Installs everything the tests need (scripts/setup.sh) and runs the whole suite,
# the slow integration tests with real Prometheus, Alertmanager and node_exporter included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
