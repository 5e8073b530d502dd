"""The fleet on VictoriaMetrics, with the real Debian binaries (victoria-metrics 1.79: victoria-metrics,
vmagent, vmalert) and the shipped configuration (packaging/victoriametrics/):

- fast: vmalert loads every shipped rule file (`vmalert -dryRun`, with the shipped flags), vmagent
  accepts the shipped scrape configuration, which relabels as the Prometheus one does, the units verify;
- slow, end to end: simulated agents -> vmagent (shipped scrape jobs and flags) -> victoria-metrics
  (shipped flags) -> vmalert (the shipped rules, unchanged, with the shipped flags and their `for:`)
  -> a real Alertmanager -> a webhook: the pages name the right alert, node and severity, none comes from
  a healthy node, and every dashboard query answers from VictoriaMetrics' Prometheus API. Beside it the
  shipped Prometheus remote_write example (packaging/prometheus/remote-write.yml) carries the same agents
  into a second VictoriaMetrics, where the Fleet dashboard answers too.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, need_binary, start_agent_process, wait_http
from tests.servers import (
    VICTORIAMETRICS,
    Webhook,
    alertmanager,
    flag_name,
    prometheus,
    shipped_args,
    victoria_metrics,
    vmagent,
    vmalert,
    with_flags,
)
from tests.test_dashboards import answered, committed, congested_with_mig, panels
from tests.test_prometheus_scrape import FILE_SD, file_sd_targets, target_nodes

ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((ROOT / "alerts").glob("*.rules.yml"))
PROMETHEUS = ROOT / "packaging" / "prometheus"
SITE = "dc1-pod-a"  # the shipped flags' site
CLUSTER = ROOT / "tests" / "scenarios" / "cluster" / "dashboards.toml"

# Each agent's scenario. The paging nodes; two healthy ones that must never page; and, as in
# tests/test_dashboards.py, the states the rarer dashboard panels need (an XID and a lost GPU, a finished
# checkpoint, a congested fabric with two GPUs in MIG mode: the fixture plays congested_with_mig), which page too.
AGENTS = {
    "n-storage": "storage-starved",
    "n-ckpt": "checkpoint-stall",
    "n-healthy-1": "healthy",
    "n-healthy-2": "healthy",
    "n-gpu": "gpu-lost",
    "n-ckpt-done": "checkpoint",
    "n-net": "network-congested",
}
HEALTHY = {"n-healthy-1", "n-healthy-2"}
# (alert, node) -> severity: the pages that must arrive. The starvation alerts hold for 2 minutes
# (`for: 2m`), the stalled checkpoint and the lost GPU for 1 minute, as shipped.
PAGES = {
    ("StokerGpusStarvedByStorage", "n-storage"): "critical",
    ("StokerGpusStarvedByNetwork", "n-net"): "critical",
    ("StokerCheckpointStalled", "n-ckpt"): "critical",
    ("StokerGpuLost", "n-gpu"): "critical",
    ("StokerGpuXidError", "n-gpu"): "critical",
}
PAGE_DEADLINE = 300  # seconds after the agents answer: 2 minutes of `for:`, a verdict, scrapes and evaluations


# -- fast: the shipped configuration loads ---------------------------------------------------------

def test_vmalert_loads_every_shipped_rule_file_with_the_shipped_flags(tmp_path):
    """`vmalert -dryRun` parses the rules with MetricsQL and their annotation templates with vmalert's own
    functions: what a vmalert would refuse at start."""
    binary = need_binary("vmalert")
    assert RULE_FILES, "no rule file shipped"
    args = with_flags(shipped_args("vmalert.default"), rule=[str(p) for p in RULE_FILES], loggerLevel="ERROR")
    run = subprocess.run([binary, "-dryRun", *args], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(RULE_FILES[0].read_text().replace("humanizePercentage", "nosuchfunction", 1))
    run = subprocess.run([binary, "-dryRun", f"-rule={broken}", "-loggerLevel=ERROR"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode != 0 and "nosuchfunction" in run.stderr, "vmalert -dryRun checks nothing"


def test_vmagent_accepts_the_scrape_configuration_and_relabels_as_prometheus_does(tmp_path):
    config = yaml.safe_load((VICTORIAMETRICS / "vmagent.yml").read_text())
    shipped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    by_name = {j["job_name"]: j for j in config["scrape_configs"]}
    for job in shipped["scrape_configs"]:
        assert by_name[job["job_name"]]["relabel_configs"] == job["relabel_configs"], job["job_name"]
    assert config["global"]["scrape_interval"] == shipped["global"]["scrape_interval"]
    config["scrape_configs"][1]["file_sd_configs"][0]["files"] = [str(PROMETHEUS / "targets" / "*.yml")]
    path = tmp_path / "vmagent.yml"
    path.write_text(yaml.safe_dump(config))
    args = with_flags(shipped_args("vmagent.default"), promscrape__config=str(path), loggerLevel="ERROR",
                      remoteWrite__tmpDataPath=str(tmp_path / "buffer"))
    run = subprocess.run([need_binary("vmagent"), "-dryRun", *args], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def test_vmagent_gives_each_target_the_node_prometheus_gives_it(tmp_path):
    """vmagent's own relabelling engine on the shipped vmagent.yml: its static targets by name, and file_sd
    groups by address, by SD host name and with their own `node` (tests/test_prometheus_scrape.py's FILE_SD,
    where a real Prometheus gives the same), each target a node of its own."""
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "stoker-test.yml").write_text(yaml.safe_dump(file_sd_targets()))
    config = yaml.safe_load((VICTORIAMETRICS / "vmagent.yml").read_text())
    config["scrape_configs"][1]["file_sd_configs"][0]["files"] = [str(targets / "stoker-*.yml")]
    static = config["scrape_configs"][0]["static_configs"][0]["targets"]
    expected = {a: n for _, a, n in FILE_SD} | {a: a.rpartition(":")[0] for a in static}
    with vmagent(yaml.safe_dump(config), "http://127.0.0.1:9/api/v1/write") as url:
        deadline, nodes = time.monotonic() + 30, {}
        while time.monotonic() < deadline and set(nodes) != set(expected):
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=10) as resp:
                nodes = target_nodes(json.load(resp)["data"]["activeTargets"])
            time.sleep(0.5)
    assert nodes == expected


def test_shipped_flags_agree_on_the_site_and_victoria_metrics_accepts_its_own(tmp_path):
    agent = {flag_name(a): a.partition("=")[2] for a in shipped_args("vmagent.default")}
    alert = {flag_name(a): a.partition("=")[2] for a in shipped_args("vmalert.default")}
    site = agent["remoteWrite.label"]
    assert site.startswith("site=")
    assert alert["external.label"] == site, "recorded series and alerts would carry another site"
    assert alert["datasource.url"].endswith(f"?extra_label={site}"), "vmalert would sum every site's nodes"
    assert alert["remoteRead.url"].endswith(f"?extra_label={site}")
    # the server refuses an unknown or malformed flag at start: start it with exactly the shipped ones
    with victoria_metrics(shipped_args("victoria-metrics.default")) as vm:
        assert vm.query("vector(1)")


def test_site_counts_of_nodes_in_trouble_use_the_alerts_thresholds():
    """The Fleet dashboard's per-site counts (stoker.fleet) count at the thresholds the alerts and the verdicts
    use: a node counted congested is one StokerRoceCongestion would page for after 10 minutes."""
    from stoker.config import DetectConfig
    rules = {r.get("record") or r.get("alert"): r["expr"] for g in yaml.safe_load(RULE_FILES[0].read_text())["groups"]
             for r in g["rules"]}

    def threshold(expr: str) -> float:
        return float(re.search(r">\s*([0-9.]+)", expr)[1])

    for record, alert in (("site:stoker_nodes_rail_congested:count", "StokerRoceCongestion"),
                          ("site:stoker_nodes_rail_losing_packets:count", "StokerRocePacketLoss"),
                          ("site:stoker_mounts_hung:count", "StokerNasMountHung")):
        assert threshold(rules[record]) == threshold(rules[alert]), (record, alert)
    assert threshold(rules["site:stoker_nodes_rail_paused:count"]) == DetectConfig().pause_ratio


@pytest.mark.parametrize("unit", ["vmagent.service", "vmalert.service"])
def test_units_verify(unit):
    run = subprocess.run([need_binary("systemd-analyze"), "verify", str(VICTORIAMETRICS / unit)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


# -- slow: end to end ------------------------------------------------------------------------------

def scrape_config(targets_dir: Path) -> str:
    """The shipped vmagent.yml, its file_sd job reading `targets_dir` (the static job's example hosts
    removed: they do not resolve here)."""
    config = yaml.safe_load((VICTORIAMETRICS / "vmagent.yml").read_text())
    config["scrape_configs"] = [j for j in config["scrape_configs"] if "file_sd_configs" in j]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(targets_dir / "stoker-*.yml")]
    return yaml.safe_dump(config)


def remote_write_config(targets_dir: Path, write_url: str) -> str:
    """The shipped Prometheus remote_write example, pointed at this file_sd directory, the shipped rules and
    `write_url`; its intervals, external label, queue and write relabelling as shipped."""
    config = yaml.safe_load((PROMETHEUS / "remote-write.yml").read_text())
    config["rule_files"] = [str(p) for p in RULE_FILES]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(targets_dir / "stoker-*.yml")]
    config["remote_write"][0]["url"] = write_url
    return yaml.safe_dump(config)


def dashboard_queries() -> dict[tuple[str, str, str], tuple[str, tuple[str, ...]]]:
    """Every query of every dashboard (and the query variables), with the nodes to try it on. Grafana's
    $__rate_interval at a 15 s scrape is 1m; variables this module does not know match everything."""
    known = ("$__range_s", "$__range", "$site", "$node", "$gpu")
    out = {}
    for name, dash, p in panels():
        nodes = (".*",) if dash["uid"] == "stoker-fleet" else (*AGENTS, "node-00", "node-01")
        for t in p["targets"]:
            out[(name, p["title"], t["refId"])] = (t["expr"], nodes)
    for name, dash in committed().items():
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                expr = re.search(r"label_values\((.+), \w+\)", v["definition"])[1]
                out[(name, "variable", v["name"])] = (expr, tuple(AGENTS) if "$node" in expr else (".*",))
    for key, (expr, nodes) in out.items():
        expr = expr.replace("$__rate_interval", "1m")
        expr = re.sub(r"\$\{?(\w+)\}?", lambda m: m[0] if any(m[0].startswith(k) for k in known) else ".*", expr)
        out[key] = (expr, nodes)
    return out


def answer_some(store, pending: dict) -> None:
    """One pass over the `pending` queries: those that return data now (test_dashboards.py's allowance: a query
    that only shows trouble passes when every series it selects exists) leave it. A query is tried again and
    again while the agents run their scenarios: a panel of WRITE times answers while a checkpoint writes, and
    VictoriaMetrics, unlike Prometheus, returns no NaN (0/0 while nothing is written)."""
    for key, (expr, nodes) in list(pending.items()):
        if answered(store, expr, nodes):
            del pending[key]


def unanswered(store, pending: dict, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        answer_some(store, pending)
        if pending:
            time.sleep(3)
    return sorted(pending)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The agents, and both paths running side by side on them: vmagent -> victoria-metrics <- vmalert ->
    Alertmanager -> webhook; and Prometheus (remote-write.yml) -> a second victoria-metrics."""
    tmp = tmp_path_factory.mktemp("fleet")
    ports = {node: free_port() for node in AGENTS}
    scenarios = {**AGENTS, "n-net": congested_with_mig(tmp_path_factory)}
    agents = [start_agent_process("--simulate", scenario, "--listen", f"127.0.0.1:{ports[node]}")
              for node, scenario in scenarios.items()]
    job = {"node-00": free_port(), "node-01": free_port()}  # a 2-node job held back by node-01: the jobs view
    agents.append(start_agent_process(str(CLUSTER), "--ports", *map(str, job.values()), "--probe-interval", "600",
                                      command="cluster"))
    ports.update(job)
    hook = Webhook()
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/metrics", timeout=60)
        targets = tmp / "targets"
        targets.mkdir()
        (targets / "stoker-rack-r1.yml").write_text(yaml.safe_dump(
            [{"targets": [f"127.0.0.1:{p}"], "labels": {"node": n, "rack": "r1"}} for n, p in ports.items()]))
        with ExitStack() as stack:
            vm = stack.enter_context(victoria_metrics(shipped_args("victoria-metrics.default")))
            am = stack.enter_context(alertmanager(hook.url))
            stack.enter_context(vmagent(scrape_config(targets), vm.write_url, shipped_args("vmagent.default")))
            rules = stack.enter_context(vmalert([str(p) for p in RULE_FILES], vm.url, am,
                                                shipped_args("vmalert.default")))
            central = stack.enter_context(victoria_metrics(shipped_args("victoria-metrics.default")))
            stack.enter_context(prometheus([], config_text=remote_write_config(targets, central.write_url)))
            yield {"vm": vm, "vmalert": rules, "hook": hook, "central": central, "started": time.monotonic()}
    finally:
        hook.close()
        for a in agents:
            a.terminate()
            a.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(PAGE_DEADLINE + 240)
def test_vmagent_victoria_metrics_vmalert_page_through_alertmanager_and_serve_every_dashboard(fleet):
    vm, hook = fleet["vm"], fleet["hook"]
    deadline = fleet["started"] + PAGE_DEADLINE
    queries = dashboard_queries()
    while time.monotonic() < deadline:
        got = {(a["labels"]["alertname"], a["labels"].get("node")) for a in hook.alerts}
        if set(PAGES) <= got:
            break
        answer_some(vm, queries)  # the dashboards, while the pages are on their way
        time.sleep(2)
    waited = time.monotonic() - fleet["started"]
    pages = {}
    for a in hook.alerts:
        pages.setdefault((a["labels"]["alertname"], a["labels"].get("node")), a)
    assert set(PAGES) <= set(pages), f"pages after {waited:.0f} s: {sorted(pages)}"
    for key, severity in PAGES.items():
        labels = pages[key]["labels"]
        assert labels["severity"] == severity and pages[key]["status"] == "firing", (key, labels)
        assert labels["site"] == SITE and "alertgroup" not in labels, labels  # the shipped vmalert flags
    storage = pages[("StokerGpusStarvedByStorage", "n-storage")]
    assert storage["annotations"]["runbook_url"].endswith("#stokergpusstarvedbystorage")
    assert "n-storage" in storage["annotations"]["summary"]
    assert pages[("StokerCheckpointStalled", "n-ckpt")]["labels"]["mountpoint"] == "/mnt/checkpoints"
    assert pages[("StokerGpuXidError", "n-gpu")]["labels"]["xid"] == "79"
    assert not [k for k in pages if k[1] in HEALTHY], f"a healthy node paged: {sorted(pages)}"

    # every rule evaluates on VictoriaMetrics, and its results are written back there with the site
    groups = fleet["vmalert"].rules()
    count = sum(len(re.findall(r"^\s+- (?:record|alert):", p.read_text(), re.MULTILINE)) for p in RULE_FILES)
    assert sum(len(g["rules"]) for g in groups) == count
    bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("lastError")]
    assert not bad, bad
    assert {r["metric"]["site"] for r in vm.query("node:stoker_gpus:count")} == {SITE}
    vm.wait_for('ALERTS{alertname="StokerGpusStarvedByStorage", alertstate="firing", node="n-storage"}',
                lambda r: r, timeout=30)  # written back at the evaluation that paged, seen 5 s later

    # every dashboard query answers from VictoriaMetrics' Prometheus API
    missing = unanswered(vm, queries, timeout=60)
    assert not missing, f"dashboard queries without data on VictoriaMetrics: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(PAGE_DEADLINE + 240)
def test_prometheus_remote_write_example_carries_the_fleet_into_victoria_metrics(fleet):
    """packaging/prometheus/remote-write.yml, as shipped, fills a central VictoriaMetrics the Fleet dashboard
    can read: raw series and recording rules with the pod's `site`, ALERTS, and none of the dropped buckets."""
    central = fleet["central"]
    central.wait_for('node:stoker_gpus:count{node="n-gpu"}', lambda r: r, timeout=120)
    assert {r["metric"]["site"] for r in central.query('count by (site) ({job="stoker"})')} == {SITE}
    nodes = len(AGENTS) + 2  # and the 2-node job's
    assert len(central.query('count by (node) (stoker_build_info{job="stoker"})')) == nodes
    assert not central.query("stoker_collector_duration_seconds_bucket"), "write_relabel_configs dropped nothing"
    central.wait_for('ALERTS{alertname="StokerGpuXidError", node="n-gpu"}', lambda r: r, timeout=120)
    fleet_only = {k: v for k, v in dashboard_queries().items() if k[0] == "fleet.json"}
    missing = unanswered(central, fleet_only, timeout=90)
    assert not missing, f"Fleet queries without data on the remote-written store: {missing}"
