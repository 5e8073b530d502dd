#!/usr/bin/env bash
# Installs Stoker into .venv and runs it on the built-in simulated XE9680 node.
# Metrics: http://127.0.0.1:9477/metrics   Extra arguments go to `stoker run`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
exec .venv/bin/stoker run --simulate "$@"
