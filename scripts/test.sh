#!/usr/bin/env bash
# Installs everything the tests need (scripts/setup.sh) and runs the whole suite,
# the slow integration tests with real Prometheus, Alertmanager and node_exporter included;
# then the GPU tests again on the lowest nvidia-ml-py the pin allows (.venv-lowest, ~15 s).
# Three pytest-xdist workers, whole files each (module fixtures start their servers once): the
# integration tests mostly wait on real servers, so three fit 2 cores (9 minutes against 21 in one).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
status=0
.venv/bin/python -m pytest -p no:cacheprovider -n 3 --dist loadfile "$@" || status=$?
STOKER_LOWEST_NVML=1 .venv-lowest/bin/python -m pytest -p no:cacheprovider -q \
  tests/test_gpu_source.py tests/test_nvml_drivers.py || status=$?
exit $status
