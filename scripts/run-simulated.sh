#!/usr/bin/env bash
# Installs Stoker into .venv and runs it on the built-in simulated XE9680 node.
# Metrics: http://127.0.0.1:9477/metrics   Extra arguments go to `stoker run`.
# It installs (pip install -e .) only when .venv is missing or pyproject.toml changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# pip writes the dist-info of an (editable) install afresh each time: its age is the install's
installed=$(find .venv/lib -maxdepth 3 -type d -name 'stoker-*.dist-info' -newer pyproject.toml -print -quit 2>/dev/null)
if [ -z "$installed" ] || [ ! -x .venv/bin/stoker ]; then
  .venv/bin/python -m pip install -q -e .
fi
exec .venv/bin/stoker run --simulate "$@"
