"""Dashboards: generated from code, linted as an operator would read them, and every query run on real
Prometheus servers: Node and GPU health on one that scraped simulated agents with the rules, Fleet on one
that only federates from it (packaging/prometheus/federation.yml), and Fleet's cost at 1,000 nodes."""

from __future__ import annotations

import http.server
import importlib.util
import json
import random
import re
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from stoker.detect.peer import VERDICT_CAUSES
from tests.conftest import free_port, start_agent_process, wait_http
from tests.contract import contract
from tests.servers import flag_name, prometheus, shipped_args

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
RULES = ROOT / "alerts" / "stoker.rules.yml"
FEDERATION = ROOT / "packaging" / "prometheus" / "federation.yml"
CLUSTER = ROOT / "tests" / "scenarios" / "cluster" / "dashboards.toml"
PROVISIONING = ROOT / "packaging" / "grafana" / "provisioning"
SCENARIOS = ROOT / "stoker" / "sim" / "data" / "scenarios"
RANGE = re.compile(r"\[([^\]]+)\]")
NAME = re.compile(r"\b((?:[a-z_]+:)?stoker_[a-z0-9_]+(?::[a-z0-9_]+)?)\b")
SELECTOR = re.compile(r"\b((?:[a-z_]+:)?stoker_[a-z0-9_]+(?::[a-z0-9_]+)?|ALERTS|up|scrape_[a-z_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'\b(\w+)(=~|=|!~|!=)"([^"]*)"')
PER_NODE = ("stoker-node", "stoker-gpu-health")
NODES = 1000


def generator():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panels(uid: str | None = None):
    for name, dash in committed().items():
        if uid is None or dash["uid"] == uid:
            for p in dash["panels"]:
                if p["type"] != "row":
                    yield name, dash, p


def exprs(uids=None) -> list[str]:
    return [t["expr"] for uid in (uids or [None]) for _, _, p in panels(uid) for t in p["targets"]]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def node_alerts() -> list[dict]:
    """The alerts about one node (all but the per-job ones of docs/JOBS.md, read across a job's nodes): the
    runbook sends their reader to the node's dashboards."""
    return [r for r in rules() if "alert" in r and not re.search(r"\bby \(job_id\)", r["expr"])]


def recorded() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in rules() if "record" in r}


def sources(expr: str) -> set[str]:
    """The metrics an expression reads, recording rules resolved down to the agent's series (and kept)."""
    out, rec = set(), recorded()
    for name in NAME.findall(expr):
        out |= {name} | (sources(rec[name]) if name in rec else set())
    return out | ({"up"} if re.search(r"\bup\{", expr) else set())


def substitute(expr: str, node: str = ".*", site: str = ".*") -> str:
    for var, value in (("$__rate_interval", "10s"), ("$__range_s", "60"), ("$__range", "1m"), ("$site", site),
                       ("$node", node), ("$gpu", ".*"), ("$job_id", ".*")):
        expr = expr.replace(var, value)
    return expr


def selectors(expr: str) -> list[str]:
    return [name + (labels or "") for name, labels in SELECTOR.findall(expr)]


def filtered(expr: str) -> bool:
    """A query that returns series only while something is wrong (`> 0`, `== 0`): checked by its selectors."""
    return bool(re.search(r"(?<![<>=!])(>|<|==)\s*[0-9]", expr.replace("or vector(0)", "")))


# -- static lint -------------------------------------------------------------------------------------

def test_regenerating_reproduces_the_committed_json():
    gen = generator()
    assert set(gen.DASHBOARDS) == set(committed())
    for name, build in gen.DASHBOARDS.items():
        assert gen.render(build) == (DASHBOARDS / name).read_text(), f"{name} is stale: run dashboards/generate.py"


def alert_windows() -> set[tuple[str, str]]:
    """(metric, window) pairs the alerts use: a panel may show the alert's own window for its metric."""
    return {(m, w) for r in rules() if "alert" in r
            for m, w in re.findall(r"(stoker_[a-z0-9_]+)(?:\{[^}]*\})?\[(\w+)\]", r["expr"])}


def test_lint_datasource_variables_units_and_rate_intervals():
    uids = {d["uid"] for d in committed().values()}
    assert uids == {"stoker-fleet", "stoker-node", "stoker-gpu-health"}
    for name, dash in committed().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["site"]["includeAll"] and variables["site"]["allValue"] == ".*", name
        if dash["uid"] in PER_NODE:
            assert not variables["node"]["multi"], f"{name}: one node"
        assert any("ALERTS" in a["expr"] for a in dash["annotations"]["list"]), f"{name}: alerts not annotated"
    windows = alert_windows()
    for name, dash, p in panels():
        where = f"{name} / {p['title']}"
        assert p["datasource"]["uid"] == "${datasource}", where
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", where
            for metric, window in re.findall(r"([a-z_:0-9]+)\{[^}]*\}\[([^\]]+)\]", t["expr"]):
                assert window in ("$__rate_interval", "$__range") or (metric, window) in windows, \
                    f"{where}: fixed range [{window}] on {metric}, not an alert's"
            variable = "$site" if dash["uid"] == "stoker-fleet" else "$node"
            spans_nodes = dash["uid"] == "stoker-node" and "$job_id" in t["expr"]  # a job's panels: all its nodes
            assert variable in t["expr"] or spans_nodes, f"{where}: query ignores the {variable} variable"


def test_layout_headline_rows_shared_crosshair_and_descriptions():
    for name, dash in committed().items():
        assert dash["graphTooltip"] == 1, f"{name}: no shared crosshair"
        kinds = [p["type"] for p in dash["panels"]]
        assert kinds[0] == "row" and dash["panels"][0]["title"] == "Now", f"{name}: no headline row"
        headline = dash["panels"][1:kinds.index("row", 1)]
        assert [p["type"] for p in headline[:6]] == ["stat"] * 6, f"{name}: the headline row is not stats"
        assert all(t["instant"] for p in headline for t in p["targets"]), f"{name}: the headline is not instant"
        assert kinds.count("row") >= 6, f"{name}: no rows per subsystem"
        cells = set()
        for p in dash["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, (name, p["title"])
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, f"{name} / {p['title']} overlaps another panel"
            cells |= area
    for name, _, p in panels():
        assert len(p["description"]) >= 40, f"{name} / {p['title']}: no description"


def test_state_panels_have_value_mappings_and_stacking_is_where_grafana_reads_it():
    for name, _, p in panels():
        where = f"{name} / {p['title']}"
        defaults = p["fieldConfig"]["defaults"]
        assert "stacking" not in defaults, f"{where}: Grafana reads stacking from defaults.custom"
        if p["type"] == "state-timeline":
            values = {k for m in defaults.get("mappings", []) for k in m["options"]}
            assert {"0", "1"} <= values, f"{where}: a state without value mappings paints 0 and 1 alike"
        if p["type"] == "stat" and p["fieldConfig"]["defaults"]["unit"] == "none":
            assert defaults.get("mappings") or p["options"]["textMode"] == "name", f"{where}: a state stat unmapped"
        if p["type"] == "timeseries":
            legend = p["options"]["legend"]
            assert legend["displayMode"] == "table" and legend["calcs"], f"{where}: a list legend"
    stacked = [p["title"] for _, _, p in panels() if p["type"] == "timeseries"
               and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"]
    assert len(stacked) >= 3, stacked


def percent_exprs():
    """Every query drawn in percent: a panel's, a series' (override by query) or a table column's."""
    for name, _, p in panels():
        default = p["fieldConfig"]["defaults"]["unit"]
        units = {o["matcher"]["options"]: prop["value"] for o in p["fieldConfig"]["overrides"]
                 for prop in o["properties"] if prop["id"] == "unit"}
        renamed = {new: old for t in p["transformations"] if t["id"] == "organize"
                   for old, new in t["options"]["renameByName"].items()}
        for t in p["targets"]:
            column = "Value" if len(p["targets"]) == 1 else f"Value #{t['refId']}"
            unit = next((u for key, u in units.items() if key in (t["refId"], renamed.get(key))
                         or renamed.get(key) == column), default)
            if unit in ("percentunit", "percent"):
                yield f"{name} / {p['title']} / {t['refId']}", t["expr"]


def test_no_percent_is_summed_without_a_denominator():
    checked = 0
    for where, expr in percent_exprs():
        if re.search(r"\bsum\s*(\(|by\b|without\b)", expr):
            checked += 1
            assert " / " in expr, f"{where}: a sum of percentages (40 starved nodes read 4000%)"
    assert checked >= 3


def test_links_keep_time_and_variables_and_reach_node_and_gpu():
    dashboards = committed().values()
    uids = {d["uid"] for d in dashboards}
    for dash in dashboards:
        [nav] = dash["links"]
        assert nav["type"] == "dashboards" and nav["tags"] == ["stoker"] and nav["keepTime"] and nav["includeVars"]
    links: dict[str, list[tuple[str, dict]]] = {}
    for name, dash, p in panels():
        found = p["fieldConfig"]["defaults"].get("links", []) + [
            v for o in p["fieldConfig"]["overrides"] for prop in o["properties"] if prop["id"] == "links"
            for v in prop["value"]]
        for link in found:
            links.setdefault(dash["uid"], []).append((p["title"], link))
            target = re.match(r"/d/([a-z-]+)/", link["url"]).group(1)
            assert target in uids, link["url"]
            assert "${__url_time_range}" in link["url"] and "${datasource:queryparam}" in link["url"], link["url"]
    for _, _, p in panels("stoker-fleet"):  # every Fleet table of nodes links each row to its node
        if p["type"] == "table" and any(re.search(r"\b(node[a-z_]*:|ALERTS)", t["expr"]) for t in p["targets"]) \
                and not p["title"].startswith("Starved nodes by rack"):
            assert (p["title"], _row_link()) in links["stoker-fleet"], f"{p['title']}: no link to the node"
    assert any("var-node=${__field.labels.node}" in link["url"] and "var-gpu=${__field.labels.gpu}" in link["url"]
               for _, link in links["stoker-node"]), "no way from the node's GPUs to their health"


def _row_link() -> dict:
    return generator().ROW_TO_NODE


def selections(expr: str) -> list[tuple[str, dict[str, str]]]:
    """Each selector of an expression as (metric, {label: matcher}), recording rules resolved."""
    out, rec = [], recorded()
    for name, labels in SELECTOR.findall(expr):
        matchers = {label: value for label, op, value in MATCHER.findall(labels) if op in ("=", "=~")}
        out.append((name, matchers))
        if name in rec:
            out += selections(rec[name])
    return out


def test_every_alert_has_its_evidence_on_the_node_or_gpu_dashboard():
    """Every series an alert reads (through its recording rules), with the label values it selects (which
    counters, reasons, kinds...), is on a Node or GPU health panel: the runbook's "check the node dashboard"."""
    shown = [sel for e in exprs(PER_NODE) for sel in selections(e)]
    for r in node_alerts():
        for metric, matchers in selections(r["expr"]):
            if ":" in metric:
                continue
            panels_of = [m for name, m in shown if name == metric]
            assert panels_of, f"{r['alert']}: {metric} on no Node or GPU health panel"
            for label, value in matchers.items():
                if label in ("job", "alertstate"):
                    continue
                for v in value.split("|"):
                    assert any(label not in m or v in m[label].split("|") or m[label].startswith("$")
                               for m in panels_of), f"{r['alert']}: {metric}{{{label}={v}}} on no panel"


def test_alert_thresholds_are_drawn_where_the_alert_fires():
    exempt = {"StokerRoceCongestion": "the rule adds ECN marks, CNPs sent and CNPs handled: the panels split the "
              "receiver side from the sender side and draw the verdicts' 500/s"}
    drawn: dict[float, set[str]] = {}
    for _, _, p in panels():
        steps = [s["value"] for s in p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])]
        for value in steps[1:]:
            drawn.setdefault(value, set()).update(*(sources(t["expr"]) for t in p["targets"]))
    checked = 0
    for r in (r for r in node_alerts() if r["alert"] not in exempt):
        for threshold in (float(v) for v in re.findall(r">\s*([0-9.]+)\b", r["expr"])):
            if threshold > 0:
                checked += 1
                metrics = {m for m in sources(r["expr"]) if ":" not in m}
                assert metrics & drawn.get(threshold, set()), f"{r['alert']}: no panel draws {threshold}"
    assert checked >= 8


# Contract metrics no dashboard shows, each with its reason. A metric added to docs/METRICS.md goes on a
# panel (dashboards/generate.py) or here: half the contract was once invisible.
NOT_ON_A_DASHBOARD = {
    "stoker_gpu_busy_ratio": "drawn from its integral, stoker_gpu_busy_seconds_total, exact between scrapes",
    "stoker_job_steps_total": "the step-time histogram's count is the same number; the table shows the last step",
    "process_virtual_memory_bytes": "the address space of a Python process with libnvidia-ml mapped says nothing "
                                    "of its cost: the resident memory, on the Node dashboard, does",
}


def test_every_metric_of_the_contract_is_on_a_dashboard():
    text = " ".join(exprs())
    for name, (kind, _) in contract().items():
        names = {name} | ({name + s for s in ("_bucket", "_count", "_sum")} if kind == "histogram" else set())
        shown = any(re.search(rf"\b{n}\b", text) for n in names)
        assert shown or name in NOT_ON_A_DASHBOARD, \
            f"{name} is on no dashboard: add a panel, or say why not in NOT_ON_A_DASHBOARD"
        assert not (shown and name in NOT_ON_A_DASHBOARD), f"{name} is on a dashboard now"


def test_fleet_reads_only_recording_rules_and_alerts():
    rec = recorded()
    for expr in exprs(["stoker-fleet"]):
        for metric in SELECTOR.findall(expr):
            assert metric[0] in rec or metric[0] == "ALERTS", f"Fleet reads {metric[0]}: not federated"
    for name, dash in committed().items():
        for v in dash["templating"]["list"]:
            if v["type"] == "query" and dash["uid"] not in PER_NODE:
                metric = re.search(r"label_values\(([a-z_:]+)", v["definition"]).group(1)
                assert metric in rec, (name, metric)


def test_node_and_gpu_pickers_read_the_agents_own_series():
    """The Node and GPU health dashboards read one node's raw series; their pickers must too, or they are
    empty on a Prometheus without Stoker's rules, where every panel would answer."""
    rec = recorded()
    for name, dash in committed().items():
        if dash["uid"] in PER_NODE:
            for v in dash["templating"]["list"]:
                if v["type"] == "query":
                    metric = re.search(r"label_values\(([a-z_:]+)", v["definition"]).group(1)
                    assert metric not in rec and metric in contract(), (name, v["name"], metric)


def test_provisioned_data_sources_are_what_the_dashboards_pick_at_the_shipped_servers():
    """packaging/grafana/provisioning/: each data source is of the one type the dashboards' ${datasource}
    variable lists (Grafana's Prometheus data source, for VictoriaMetrics too: its Prometheus API answers every
    dashboard query, tests/test_fleet_vm.py), at the port the shipped server listens on, its timeInterval the
    shipped scrape interval ($__rate_interval is built on it); the dashboard provider reads one directory."""
    kinds = {v["query"] for dash in committed().values() for v in dash["templating"]["list"]
             if v["type"] == "datasource"}
    scrape = {yaml.safe_load((ROOT / "packaging" / path).read_text())["global"]["scrape_interval"]
              for path in ("prometheus/prometheus.yml", "victoriametrics/vmagent.yml")}
    vm_port = next(int(a.rpartition(":")[2]) for a in shipped_args("victoria-metrics.default")
                   if flag_name(a) == "httpListenAddr")
    sources = [d for p in sorted((PROVISIONING / "datasources").glob("*.yml"))
               for d in yaml.safe_load(p.read_text())["datasources"]]
    assert kinds == {"prometheus"} and len(scrape) == 1
    assert {urllib.parse.urlsplit(d["url"]).port: d["name"] for d in sources} == {9090: "Prometheus",
                                                                                vm_port: "VictoriaMetrics"}
    for d in sources:
        assert d["type"] == "prometheus" and d["access"] == "proxy" and d["jsonData"]["timeInterval"] in scrape, d
    provider, = yaml.safe_load((PROVISIONING / "dashboards" / "stoker.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# -- real Prometheus ---------------------------------------------------------------------------------

def exported_names(body: str) -> set[str]:
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
            if kind == "histogram":
                names |= {name + s for s in ("_bucket", "_count", "_sum")}
    return names


def federation_job(target: str, site: str, match: list[str] | None = None) -> str:
    """The body of a scrape job federating `target` with the shipped match[] (or `match`)."""
    shipped = yaml.safe_load(FEDERATION.read_text())["scrape_configs"][0]
    params = {"match[]": match or shipped["params"]["match[]"]}
    return (f"    honor_labels: {json.dumps(shipped['honor_labels'])}\n    metrics_path: {shipped['metrics_path']}\n"
            f"    params: {json.dumps(params)}\n    static_configs:\n"
            f"      - targets: [\"{target}\"]\n        labels: {{site: \"{site}\"}}\n")


def after_every_first_cycle(url: str, timeout: float = 30) -> str:
    """The exposition once every collector has finished a cycle (its stoker_collector_up 1): a collector's
    families appear after its first, and a body read as soon as the agent answered (a loaded machine) missed
    the verdicts' ones."""
    deadline = time.monotonic() + timeout
    while True:
        body = urllib.request.urlopen(url).read().decode()
        up = [line for line in body.splitlines() if line.startswith("stoker_collector_up{")]
        if up and all(line.endswith(" 1.0") for line in up):
            return body
        assert time.monotonic() < deadline, f"collectors without a cycle after {timeout} s: {up}"
        time.sleep(0.2)


def congested_with_mig(tmp_path_factory) -> str:
    """The built-in congested fabric with GPUs 0 and 1 in MIG mode, two instances each (docs/SCENARIOS.md,
    `mig`): the GPU health dashboard's MIG panels have data, and the network verdict is reached all the same."""
    path = tmp_path_factory.mktemp("scenarios") / "network-congested-mig.toml"
    path.write_text("mig = [0, 1]\n" + (SCENARIOS / "network-congested.toml").read_text())
    return str(path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Three simulated nodes (a lost GPU with its XID; a checkpoint; a congested fabric, two of its GPUs in MIG
    mode) and a simulated 2-node job held back by one of its nodes (the jobs view:
    tests/scenarios/cluster/dashboards.toml), scraped by a pod Prometheus with the rules, and a global Prometheus
    that federates from it with exactly the shipped match[]."""
    scenarios = {"n-gpu": "gpu-lost", "n-ckpt": "checkpoint", "n-net": congested_with_mig(tmp_path_factory)}
    ports = {node: free_port() for node in scenarios}
    agents = [start_agent_process("--simulate", scenario, "--listen", f"127.0.0.1:{ports[node]}")
              for node, scenario in scenarios.items()]
    job = {"node-00": free_port(), "node-01": free_port()}
    agents.append(start_agent_process(str(CLUSTER), "--ports", *map(str, job.values()), "--probe-interval", "600",
                                      command="cluster"))
    ports.update(job)
    static = "".join(f'      - targets: ["127.0.0.1:{p}"]\n        labels: {{node: "{n}", rack: "r1"}}\n'
                     for n, p in ports.items())
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/metrics")
        body = after_every_first_cycle(f"http://127.0.0.1:{ports['n-gpu']}/metrics")
        with prometheus([], rule_files=[str(RULES)], static_configs=static) as pod:
            pod_address = pod.url.removeprefix("http://")
            with prometheus([], static_configs=federation_job(pod_address, "pod-a"), job_body=True) as central:
                yield pod, central, exported_names(body)
    finally:
        for a in agents:
            a.terminate()
            a.wait(timeout=10)


def answered(prom, expr: str, nodes=("n-gpu", "n-ckpt", "n-net")) -> bool:
    """Data for one of the nodes; a query that only shows trouble: every series it selects exists."""
    for node in nodes:
        query = substitute(expr, node)
        if prom.query(query):
            return True
        if filtered(expr) and all(prom.query(f"count({s})") for s in selectors(query)):
            return True
    return False


def wait_until_answered(prom, queries: dict, nodes=("n-gpu", "n-ckpt", "n-net"), timeout: float = 90) -> dict:
    pending = dict(queries)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, expr in list(pending.items()):
            if answered(prom, expr, nodes):
                del pending[key]
        time.sleep(2)
    return pending


@pytest.mark.slow
def test_panels_only_use_metrics_the_agent_exports(stack):
    _, _, exported = stack
    known = exported | set(recorded())
    for name, _, p in panels():
        for t in p["targets"]:
            for metric in NAME.findall(t["expr"]):
                assert metric in known, f"{name} / {p['title']}: {metric} is not exported"


@pytest.mark.slow
def test_every_node_and_gpu_query_answers_on_the_prometheus_that_scrapes_the_nodes(stack):
    pod, _, _ = stack
    queries = {(name, p["title"], t["refId"]): t["expr"] for uid in PER_NODE for name, _, p in panels(uid)
               for t in p["targets"]}
    for name, dash in committed().items():
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                queries[(name, "variable", v["name"])] = re.search(r"label_values\((.+), \w+\)", v["definition"])[1]
    pending = wait_until_answered(pod, queries, nodes=("n-gpu", "n-ckpt", "n-net", "node-00"))  # node-00: a 2-node job
    assert not pending, f"queries that never returned data: {sorted(pending)}"
    recent = pod.query(substitute('stoker_checkpoint_recent_written_bytes{node="$node"}', "n-ckpt"))
    assert recent and recent[0]["metric"]["outcome"] == "completed" and float(recent[0]["value"][1]) > 1e9


def label_values(prom, definition: str, values: dict[str, str]) -> list[str]:
    """A picker's options as Grafana's Prometheus data source asks for `label_values(SELECTOR, LABEL)`:
    /api/v1/label/LABEL/values?match[]=SELECTOR, the earlier pickers' values substituted (All: `.*`)."""
    selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", definition).groups()
    for name, value in values.items():
        selector = selector.replace(f"${name}", value)
    query = urllib.parse.urlencode({"match[]": selector})
    with urllib.request.urlopen(f"{prom.url}/api/v1/label/{label}/values?{query}", timeout=10) as resp:
        return json.load(resp)["data"]


@pytest.mark.slow
def test_node_and_gpu_pickers_fill_on_a_prometheus_without_the_rules():
    """A Prometheus that only scrapes (no rule file): the Node and GPU health pickers list the node, its GPUs
    and its job, so every panel of theirs can be reached. Until the Node picker read `stoker_build_info` it
    read a recording rule here and listed nothing."""
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--listen", f"127.0.0.1:{port}")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        static = f'      - targets: ["127.0.0.1:{port}"]\n        labels: {{node: "n-1"}}\n'
        with prometheus([], static_configs=static) as prom:
            prom.wait_for('stoker_gpu_job_info{job_id!="unknown"}', lambda r: r)
            for name, dash in committed().items():
                if dash["uid"] not in PER_NODE:
                    continue
                values = {}
                for v in dash["templating"]["list"]:
                    if v["type"] == "query":
                        options = label_values(prom, v["definition"], values)
                        if v["name"] == "site":
                            assert options == [], "a single Prometheus has no site: the picker offers All"
                        else:
                            assert options, f"{name}: the {v['name']} picker is empty"
                        values[v["name"]] = options[0] if options and not v["multi"] else ".*"
                assert values["node"] == "n-1", name
    finally:
        agent.terminate()
        agent.wait(timeout=10)


@pytest.mark.slow
def test_every_fleet_query_answers_on_a_federated_prometheus_and_on_the_pod_one(stack):
    """The central store has only what federation.yml ships (the recording rules and ALERTS): every Fleet
    query, and the site variable, reads series it has; the same queries work on the pod Prometheus."""
    pod, central, _ = stack
    queries = {(p["title"], t["refId"]): t["expr"] for _, _, p in panels("stoker-fleet") for t in p["targets"]}
    queries[("variable", "site")] = "node_rack:stoker_agent_up:max"
    central.wait_for('ALERTS{alertname="StokerGpuXidError", site="pod-a"}', lambda r: r, timeout=60)
    for prom in (central, pod):
        pending = wait_until_answered(prom, queries, nodes=(".*",))
        assert not pending, f"{prom.url}: Fleet queries without data: {sorted(pending)}"
    assert {r["metric"]["site"] for r in central.query("site:stoker_job_share:sum_rate10m")} == {"pod-a"}
    assert not central.query('{__name__=~"stoker_.+"}'), "raw series reached the central store"


@pytest.mark.slow
def test_every_rule_loads_and_evaluates_without_error(stack):
    pod, _, _ = stack
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        rules_now = [r for g in pod.rules() for r in g["rules"]]
        if rules_now and all(r.get("lastEvaluation", "").startswith("20") for r in rules_now):
            break
        time.sleep(1)
    assert len(rules_now) == len(re.findall(r"^\s+- (?:record|alert):", RULES.read_text(), re.MULTILINE))
    bad = [(r["name"], r.get("lastError")) for r in rules_now if r["health"] != "ok"]
    assert not bad, bad
    assert pod.query("node:stoker_gpu_busy_ratio:avg"), "recording rules produced no data"
    firing = pod.wait_for('ALERTS{alertname="StokerGpuXidError", alertstate="firing"}', lambda r: r, timeout=30)
    assert firing[0]["metric"]["xid"] == "79" and firing[0]["metric"]["node"] == "n-gpu"
    gpus = pod.wait_for('node:stoker_gpus_lost:sum{node="n-gpu"}', lambda r: r and float(r[0]["value"][1]) == 1)
    assert gpus and pod.query('node:stoker_gpus:count{node="n-gpu"}')[0]["value"][1] == "8"


# -- query cost at 1,000 nodes -----------------------------------------------------------------------

def synthetic_fleet(central_url: str, nodes: int) -> str:
    """What a central store federates from `nodes` nodes in 2 sites (20 nodes a rack): the two simulated
    nodes' federated series, each copied onto half the nodes with jittered values, the per-site ones per site."""
    text = urllib.request.urlopen(f"{central_url}/federate?match[]=" + urllib.parse.quote('{__name__=~".+"}')).read()
    template: dict[str, list[str]] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 2)[:2]
            node = re.search(r'node="([^"]+)"', series)
            series = re.sub(r',?(instance|job)="[^"]*"', "", series).replace("{,", "{")
            template.setdefault(node[1] if node else "", []).append(f"{series} {value}")
    rng, out = random.Random(7), []
    for site in ("s0", "s1"):
        out += [line.replace('site="pod-a"', f'site="{site}"') for line in template[""]]
    names = sorted(k for k in template if k)
    for i in range(nodes):
        site, rack = f"s{i % 2}", f"r{i // 20:03d}"
        for line in template[names[i % len(names)]]:
            series, value = line.rsplit(" ", 1)
            series = re.sub(r'node="[^"]+"', f'node="n{i:05d}"', series).replace('site="pod-a"', f'site="{site}"')
            series = re.sub(r'rack="[^"]*"', f'rack="{rack}"', series)
            jitter = float(value) * rng.uniform(0.5, 1.5) if value not in ("NaN", "+Inf", "-Inf") else value
            out.append(f"{series} {jitter}")
    return "\n".join(out) + "\n"


class Exposition(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_fleet_query_cost_stays_bounded_at_1000_nodes(stack):
    """Series each Fleet query touches (every selector's matches, summed) at 1,000 node label sets: a few
    per node for the tables and distributions, a few per site for the time series and stats."""
    _, central, _ = stack
    central.wait_for("node_cause:stoker_starved_gpus:rate10m", lambda r: len(r) >= 8, timeout=60)
    handler = type("Fleet", (Exposition,), {"body": synthetic_fleet(central.url, NODES).encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    job = federation_job(f"127.0.0.1:{server.server_address[1]}", "unused", match=["{}"])
    job = job.replace("metrics_path: /federate", "metrics_path: /metrics")
    try:
        with prometheus([], scrape_interval="5s", static_configs=job, job_body=True) as prom:
            prom.wait_for('count_over_time(site:stoker_job_share:sum_rate10m{site="s0"}[1m])',
                          lambda r: r and float(r[0]["value"][1]) >= 2, timeout=90)
            per_node = len(prom.query('{node="n00000"}'))
            cost, queries = {}, {}
            for _, _, p in panels("stoker-fleet"):
                for t in p["targets"]:
                    expr = queries[(p["title"], t["refId"])] = substitute(t["expr"])
                    touched = sum(int(float(r["value"][1])) for s in selectors(expr)
                                  for r in prom.query(f"count({s})"))
                    cost[(p["title"], t["refId"], p["type"])] = touched
                    prom.query(expr)  # and it runs
    finally:
        server.shutdown()
    per_site = ("site:", "cause:", "outcome:", "version:")
    report = "\n".join(f"{n:>7}  {k[2]:<10} {k[0]} {k[1]}" for k, n in sorted(cost.items(), key=lambda kv: -kv[1]))
    print(f"\n{per_node} federated series per node; series touched per Fleet query at {NODES} nodes:\n{report}")
    # the most a query reads: a series per node and cause, and the node's rack (the per-cause tables)
    assert max(cost.values()) <= (len(VERDICT_CAUSES) + 1) * NODES, report
    for (title, ref, kind), n in cost.items():
        names = [name for name, _ in SELECTOR.findall(queries[(title, ref)])]
        if all(name.startswith(per_site) for name in names):
            assert n <= 20, f"{title} {ref}: {n} series for a per-site figure"
        else:
            assert kind in ("table", "timeseries") or names == ["ALERTS"], f"{title}: a stat reading per-node series"
            assert kind != "timeseries" or n <= 2 * NODES, f"{title} {ref}: a time series reading {n} series"
