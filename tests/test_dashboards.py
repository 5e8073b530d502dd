"""Dashboards: generated from code, linted, and every query run against a real Prometheus
that scraped simulated agents; every rule loaded and evaluated there too."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, start_agent_process, wait_http
from tests.servers import prometheus

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES = ROOT / "alerts" / "stoker.rules.yml"
RANGE = re.compile(r"\[([^\]]+)\]")
NAME = re.compile(r"\b((?:[a-z_]+:)?stoker_[a-z0-9_]+(?::[a-z0-9_]+)?)\b")


def generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels():
    for name, dash in committed().items():
        for p in dash["panels"]:
            yield name, dash, p


def test_regenerating_reproduces_the_committed_json():
    gen = generator()
    assert set(gen.DASHBOARDS) == set(committed())
    for name, build in gen.DASHBOARDS.items():
        assert gen.render(build) == (DASHBOARDS / name).read_text(), f"{name} is stale: run dashboards/generate.py"


def test_lint_datasource_variables_units_and_rate_intervals():
    for name, dash in committed().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert "node" in variables, f"{name}: no node variable"
        assert any("ALERTS" in a["expr"] for a in dash["annotations"]["list"]), f"{name}: alerts not annotated"
    for name, _, p in panels():
        where = f"{name} / {p['title']}"
        assert p["datasource"]["uid"] == "${datasource}", where
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", where
            for window in RANGE.findall(t["expr"]):
                assert window in ("$__rate_interval", "$__range"), f"{where}: fixed range [{window}]"
            assert "$node" in t["expr"], f"{where}: query ignores the node variable"


def exported_names(body: str) -> set[str]:
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
            if kind == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
    return names


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two simulated nodes (a lost GPU with its XID; a checkpoint) scraped by a real Prometheus with the rules."""
    ports = {"n-gpu": free_port(), "n-ckpt": free_port()}
    agents = [start_agent_process("--simulate", scenario, "--listen", f"127.0.0.1:{ports[node]}")
              for node, scenario in (("n-gpu", "gpu-lost"), ("n-ckpt", "checkpoint"))]
    static = "".join(f'      - targets: ["127.0.0.1:{p}"]\n        labels: {{node: "{n}"}}\n' for n, p in ports.items())
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/metrics")
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{ports['n-gpu']}/metrics").read().decode()
        with prometheus([], rule_files=[str(RULES)], static_configs=static) as prom:
            yield prom, exported_names(body)
    finally:
        for a in agents:
            a.terminate()
            a.wait(timeout=10)


def recorded_names() -> set[str]:
    return set(re.findall(r"record: (\S+)", RULES.read_text()))


@pytest.mark.slow
def test_panels_only_use_metrics_the_agent_exports(stack):
    _, exported = stack
    known = exported | recorded_names()
    for name, _, p in panels():
        for t in p["targets"]:
            for metric in NAME.findall(t["expr"]):
                assert metric in known, f"{name} / {p['title']}: {metric} is not exported"


@pytest.mark.slow
def test_every_panel_query_returns_data_from_a_real_prometheus(stack):
    prom, _ = stack
    pending = {}
    for name, dash, p in panels():
        for t in p["targets"]:
            pending[(name, p["title"], t["refId"])] = t["expr"]
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        for key, expr in list(pending.items()):
            for node in ("n-gpu", "n-ckpt"):
                query = expr.replace("$__rate_interval", "10s").replace("$__range", "1m").replace("$node", node)
                if prom.query(query):
                    del pending[key]
                    break
        time.sleep(2)
    assert not pending, f"queries that never returned data: {sorted(pending)}"


@pytest.mark.slow
def test_every_rule_loads_and_evaluates_without_error(stack):
    prom, _ = stack
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        rules = [r for g in prom.rules() for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        time.sleep(1)
    assert len(rules) == len(re.findall(r"^\s+- (?:record|alert):", RULES.read_text(), re.M))
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    assert prom.query("node:stoker_gpu_busy_ratio:avg"), "recording rules produced no data"
    firing = prom.wait_for('ALERTS{alertname="StokerGpuXidError", alertstate="firing"}', lambda r: r, timeout=30)
    assert firing[0]["metric"]["xid"] == "79" and firing[0]["metric"]["node"] == "n-gpu"
