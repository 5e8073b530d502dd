"""A real Prometheus scrapes the agent on the simulated node; the shipped scrape jobs give every target a
`node` label of its own, by address or by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, start_agent_process, wait_http
from tests.servers import prometheus

ROOT = Path(__file__).resolve().parent.parent
SCRAPE_EXAMPLES = [ROOT / "packaging" / "prometheus" / "prometheus.yml",
                   ROOT / "packaging" / "prometheus" / "remote-write.yml",
                   ROOT / "packaging" / "victoriametrics" / "vmagent.yml"]
# file_sd target groups, each target never scraped (documentation addresses, RFC 5737 and RFC 3849), and
# the `node` each must get: the group's own label wins, then a host name as service discovery sets it
# (the label names of Prometheus' kubernetes_sd and consul_sd), then the whole address without the port.
FILE_SD = [
    ({"node": "gpu-node-001", "rack": "a01", "__meta_kubernetes_pod_node_name": "k8s-name"}, "192.0.2.1:9477",
     "gpu-node-001"),
    ({"__meta_kubernetes_pod_node_name": "gpu-node-002"}, "192.0.2.2:9477", "gpu-node-002"),
    ({"__meta_kubernetes_node_name": "gpu-node-003"}, "192.0.2.3:9477", "gpu-node-003"),
    ({"__meta_consul_node": "gpu-node-004"}, "192.0.2.4:9477", "gpu-node-004"),
    ({"rack": "a02"}, "192.0.2.5:9477", "192.0.2.5"),
    ({"rack": "a02"}, "192.0.2.15:9477", "192.0.2.15"),
    ({}, "[2001:db8::6]:9477", "[2001:db8::6]"),
    ({}, "gpu-node-007.example:9477", "gpu-node-007.example"),
]


def file_sd_targets() -> list[dict]:
    return [{"targets": [address], "labels": labels} for labels, address, _ in FILE_SD]


def target_nodes(targets: list[dict]) -> dict[str, str]:
    """instance -> node of the active targets (/api/v1/targets, Prometheus' and vmagent's)."""
    return {t["labels"]["instance"]: t["labels"].get("node") for t in targets}


def node_rules() -> list[tuple[str, str, dict]]:
    return [(path.name, job["job_name"], rule) for path in SCRAPE_EXAMPLES
            for job in yaml.safe_load(path.read_text())["scrape_configs"]
            for rule in job.get("relabel_configs", []) if rule.get("target_label") == "node"]


def test_every_shipped_scrape_job_derives_node_with_the_same_rule():
    """One rule, in every job of every shipped scrape example (the static and file_sd jobs of Prometheus and
    vmagent, and the remote_write pod Prometheus): what the rules and dashboards group by must not depend on
    which example a site copied."""
    rules = node_rules()
    jobs = {(path.name, job["job_name"]) for path in SCRAPE_EXAMPLES
            for job in yaml.safe_load(path.read_text())["scrape_configs"]}
    assert {(f, j) for f, j, _ in rules} == jobs and len(rules) == len(jobs), rules
    assert len({json.dumps(r, sort_keys=True) for _, _, r in rules}) == 1, rules


@pytest.mark.slow
def test_nodes_scraped_by_address_stay_apart_and_names_come_from_discovery(tmp_path):
    """The shipped prometheus.yml, its static job listing agents by address (127.0.0.1 and 127.0.0.2, the
    same port: two loopback addresses of one Linux host) and by name (localhost), its file_sd job the groups
    of FILE_SD. Each agent's series get a node of their own (with the relabelling shipped before, every
    127.x.y.z target became node="127", every 10.x.y.z one node="10"), and each file_sd target the node its
    labels or its address give."""
    port, named = free_port(), free_port()
    listens = {"127.0.0.1": f"127.0.0.1:{port}", "127.0.0.2": f"127.0.0.2:{port}", "localhost": f"127.0.0.1:{named}"}
    agents = [start_agent_process("--simulate", "healthy", "--listen", listen) for listen in listens.values()]
    try:
        for listen in listens.values():
            wait_http(f"http://{listen}/metrics")
        (tmp_path / "stoker-test.yml").write_text(yaml.safe_dump(file_sd_targets()))
        config = yaml.safe_load(SCRAPE_EXAMPLES[0].read_text())
        del config["rule_files"], config["alerting"]
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s"}
        static, file_sd = config["scrape_configs"]
        static["static_configs"][0]["targets"] = [f"127.0.0.1:{port}", f"127.0.0.2:{port}", f"localhost:{named}"]
        file_sd["file_sd_configs"][0]["files"] = [str(tmp_path / "stoker-*.yml")]
        with prometheus([], config_text=yaml.safe_dump(config)) as prom:
            series = prom.wait_for("stoker_build_info", lambda r: len(r) == 3)
            assert {r["metric"]["node"]: r["metric"]["instance"] for r in series} == {
                "127.0.0.1": f"127.0.0.1:{port}", "127.0.0.2": f"127.0.0.2:{port}", "localhost": f"localhost:{named}"}
            assert len(prom.query("count by (node) (stoker_gpu_sm_active_ratio)")) == 3
            nodes = target_nodes(prom.targets())
            assert {address: nodes.get(address) for _, address, _ in FILE_SD} == {
                address: node for _, address, node in FILE_SD}
    finally:
        for agent in agents:
            agent.terminate()
            agent.wait(timeout=10)


@pytest.mark.slow
def test_real_prometheus_sees_sm_activity_for_eight_gpus():
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--listen", f"127.0.0.1:{port}", "--interval", "0.5")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        with prometheus([f"127.0.0.1:{port}"]) as prom:
            result = prom.wait_for("stoker_gpu_sm_active_ratio", lambda r: len(r) == 8)
            assert sorted(int(r["metric"]["gpu"]) for r in result) == list(range(8))
            assert all(0.5 < float(r["value"][1]) <= 1.0 for r in result)
            assert all(r["metric"]["uuid"].startswith("GPU-") for r in result)
            up = prom.query('up{job="stoker"}')
            assert up and up[0]["value"][1] == "1"
            rate = prom.wait_for("sum(rate(stoker_gpu_nvlink_transmit_bytes_total[5s]))", lambda r: r and float(r[0]["value"][1]) > 0)
            assert float(rate[0]["value"][1]) > 1e9  # eight GPUs moving tens of GB/s over NVLink
    finally:
        agent.terminate()
        agent.wait(timeout=10)
