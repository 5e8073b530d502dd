#!/usr/bin/env bash
# Runs every benchmark (about 18 minutes on 2 cores) and writes docs/BENCHMARKS.md and its plots.
# scripts/setup.sh installs what it needs (wrk included).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
py=.venv/bin/python
out=docs/bench
mkdir -p "$out"
$py -m bench.agent --intervals 1 0.25 --seconds 60 --out "$out/agent.json"
$py -m bench.gpu_cycle --out "$out/gpu_cycle.json"
$py -m bench.scrape --requests 10000 --out "$out/scrape.json"
$py -m bench.peer --requests 10000 --out "$out/peer.json"
$py -m bench.mountstats --out "$out/mountstats.json"
$py -m bench.cost --seconds 20 --out "$out/cost.json"
$py -m bench.detection --out "$out/detection.json"
$py -m bench.fleet --nodes 5 10 20 40 --per-process 10 --seconds 60 --out "$out/fleet.json"
$py -m bench.report --results "$out" --out docs
# On a node with NVIDIA GPUs (not run by this script): python -m bench.nvml_check --seconds 60
