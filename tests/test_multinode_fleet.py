"""Multi-node jobs paged end to end: a simulated cluster of 38 nodes (`stoker cluster`, one process, an agent
per node on its own port: tests/scenarios/cluster/fleet.toml) -> vmagent -> victoria-metrics -> vmalert with the
shipped rules -> a real Alertmanager with the shipped routes and inhibitions -> a webhook.

The shipped rules run with their `for:` cut to a quarter (multiples of the shipped 15 s evaluation), vmagent scrapes
every 2 s and VictoriaMetrics answers up to the last second (the shipped files' values otherwise): the test runs in
minutes, and the page must come within the rule's `for:` plus two evaluation intervals of the fault. What it
checks: the node holding a 16-node job back is paged with its cause, none of the 15 nodes waiting for it is; two
faulty nodes of one job are both named; a rail down names its node; a job whose every node checkpoints pages
nothing; a job that ends stops paging; single-node jobs page as before; healthy jobs never page.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from stoker.sim import cluster as sim_cluster
from stoker.sim.jobs import job_id
from tests.conftest import free_port, wait_http
from tests.servers import VICTORIAMETRICS, Webhook, alertmanager, shipped_args, victoria_metrics, vmagent, vmalert, \
    with_flags

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "stoker.rules.yml"
SCENARIO = ROOT / "tests" / "scenarios" / "cluster" / "fleet.toml"
FAULT = 45.0  # the scenario's faults begin (seconds after the cluster starts)
JOB_END = 105.0  # ends-3 ends
EVALUATION = 15  # seconds: vmalert's evaluation interval (shipped)
FOR_DIVISOR = 4  # every `for:` cut to a quarter, a multiple of the evaluation interval: 1m -> 15s, 2m -> 30s
SCRAPE = "2s"


def node(i: int) -> str:
    return sim_cluster.NODE_NAME.format(i)


JOBS = {name: job_id(name, "slurm") for name in ("llama-16", "gpt-4", "bert-4", "t5-4", "ends-3", "single-32",
                                                  "healthy-4")}
ORIGINS = {(JOBS["llama-16"], node(7), "storage"), (JOBS["gpt-4"], node(16), "storage"),
           (JOBS["gpt-4"], node(18), "host"), (JOBS["ends-3"], node(28), "storage")}
RAIL_DOWN = node(21)  # bert-4's origin: StokerRdmaPortDown, or StokerJobHeldBackByNode whichever comes first
ORIGIN_NODES = {n for _, n, _ in ORIGINS} | {RAIL_DOWN, node(32)}
VICTIMS = {node(i) for i in [*range(16), *range(16, 24), 29, 30]} - ORIGIN_NODES
QUIET = {node(i) for i in [*range(24, 28), 31, *range(34, 38)]}  # checkpointing and healthy jobs


def fast_rules() -> str:
    """The shipped rules, every `for:` cut to a quarter."""
    def cut(m: re.Match) -> str:
        value, unit = int(m[2]), m[3]
        seconds = value * {"s": 1, "m": 60, "h": 3600}[unit] // FOR_DIVISOR
        return f"{m[1]}{seconds}s"

    return re.sub(r"(\n\s+for: )(\d+)([smh])", cut, RULES.read_text())


def routing(hook_url: str) -> str:
    """The shipped routes and inhibitions, every receiver pointed at the webhook, the waits shortened."""
    config = yaml.safe_load((ROOT / "packaging" / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        receiver["webhook_configs"] = [{"url": hook_url, "send_resolved": True}]
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        route.update(group_wait="1s", group_interval="1s")
    return yaml.safe_dump(config)


def scrape_config(targets: Path) -> str:
    config = yaml.safe_load((VICTORIAMETRICS / "vmagent.yml").read_text())
    config["global"].update(scrape_interval=SCRAPE, scrape_timeout=SCRAPE)
    config["scrape_configs"] = [j for j in config["scrape_configs"] if "file_sd_configs" in j]
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(targets)]
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    spec = sim_cluster.load(str(SCENARIO))
    ports: list[int] = []
    while len(ports) < spec.nodes:
        port = free_port()
        if port not in ports:
            ports.append(port)
    targets = tmp / "stoker-cluster.json"
    log = open(tmp / "cluster.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "stoker", "cluster", str(SCENARIO), "--ports", *map(str, ports),
                             "--targets", str(targets), "--probe-interval", "600", "--started", str(tmp / "started")],
                            stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    hook = Webhook()
    rules = tmp / "stoker.rules.yml"
    rules.write_text(fast_rules())
    try:
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/metrics", timeout=120)
        started = float((tmp / "started").read_text())  # the scenario's time 0
        with ExitStack() as stack:
            vm = stack.enter_context(victoria_metrics(with_flags(shipped_args("victoria-metrics.default"),
                                                                 search__latencyOffset="1s")))
            am = stack.enter_context(alertmanager(hook.url, routing(hook.url)))
            stack.enter_context(vmagent(scrape_config(targets), vm.write_url, shipped_args("vmagent.default")))
            evaluator = stack.enter_context(vmalert([str(rules)], vm.url, am, shipped_args("vmalert.default")))
            yield {"vm": vm, "vmalert": evaluator, "hook": hook, "fault": started + FAULT, "started": started}
    finally:
        hook.close()
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_node_that_holds_a_job_back_is_paged_and_its_victims_are_not(fleet):
    vm, hook = fleet["vm"], fleet["hook"]
    page_for = 60 // FOR_DIVISOR
    budget = page_for + 2 * EVALUATION  # the rule's `for:` plus two evaluation intervals
    deadline = fleet["fault"] + budget + 30
    wanted = {("StokerJobHeldBackByNode", n, j, c) for j, n, c in ORIGINS}
    while time.time() < deadline and not wanted <= set(hook.arrived):
        time.sleep(1)
    got = set(hook.arrived)
    assert wanted <= got, f"pages: {sorted(got)}"
    late = {k: round(hook.arrived[k][0] - fleet["fault"], 1) for k in wanted}
    print(f"\nseconds from the fault to the page (budget {budget}): {late}")
    assert all(t <= budget for t in late.values()), f"later than `for:` + 2 evaluations ({budget} s): {late}"

    # the victims wait (`peer`), every one of them, while their origins have their local cause
    peers = {r["metric"]["node"] for r in vm.query('stoker_starved{cause="peer"} == 1')}
    odd = "|".join(sorted(peers ^ VICTIMS))
    assert peers == VICTIMS, (sorted(peers ^ VICTIMS), vm.query(f'stoker_starved{{node=~"{odd}"}} == 1'),
                              vm.query(f'stoker_job_multinode{{node=~"{odd}"}}'),
                              vm.query(f'stoker_gpu_busy_ratio{{node=~"{odd}", gpu="0"}}'))

    # until well past the per-node alerts' own `for:`, let every page that would come come
    time.sleep(max(0.0, fleet["started"] + JOB_END + 20 - time.time()))
    pages = {k: v for k, v in hook.arrived.items() if v[1]["labels"]["severity"] == "critical"}
    paged_nodes = {k[1] for k in pages}
    assert not paged_nodes & VICTIMS, f"a node that only waited was paged: {sorted(pages)}"
    assert not paged_nodes & QUIET, f"a healthy or checkpointing job paged: {sorted(pages)}"
    assert not {k[1] for k in hook.arrived} & (VICTIMS | QUIET), "an alert of any severity named a victim"
    assert paged_nodes <= ORIGIN_NODES, sorted(pages)
    rail = [k for k in pages if k[1] == RAIL_DOWN]
    assert rail and all(k[0] in ("StokerRdmaPortDown", "StokerJobHeldBackByNode") for k in rail), rail
    assert ("StokerGpusStarvedByStorage", node(32), JOBS["single-32"], None) in pages, "a single node pages as before"

    # the origins' own starvation alerts fire in vmalert but Alertmanager holds them behind the job's page
    firing = {(a["labels"]["alertname"], a["labels"].get("node")) for a in fleet["vmalert"].alerts()
              if a["state"] == "firing"}
    assert ("StokerGpusStarvedByStorage", node(7)) in firing
    assert ("StokerGpusStarvedByStorage", node(7)) not in {(k[0], k[1]) for k in hook.arrived}

    # the job that ended: its page resolves, nothing of it pages again
    ended = ("StokerJobHeldBackByNode", node(28), JOBS["ends-3"], "storage")
    resolved = time.time() + 60
    while time.time() < resolved and not hook.resolved.get(ended):
        time.sleep(1)
    assert hook.resolved.get(ended), "the ended job's page never resolved"
