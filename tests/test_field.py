"""What an operator does on a real machine: several simulated nodes side by side, and a hung NAS
paging through the shipped rules with production probe settings."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, need_binary, start_agent_process, wait_http
from tests.servers import prometheus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "stoker.rules.yml"


def metric(port: int, name: str, labels: str = "") -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_two_simulated_nodes_side_by_side_each_reach_their_verdict():
    agents = {}
    try:
        for scenario, cause in (("storage-starved", "storage"), ("network-congested", "network")):
            port = free_port()
            agents[port] = (cause, start_agent_process("--simulate", scenario, "--listen", f"127.0.0.1:{port}"))
        for port, (cause, proc) in agents.items():
            wait_http(f"http://127.0.0.1:{port}/metrics")
        deadline = time.monotonic() + 40
        pending = dict(agents)
        while pending and time.monotonic() < deadline:
            for port, (cause, proc) in list(pending.items()):
                assert proc.poll() is None, proc.log()
                if metric(port, "stoker_starved", f'{{cause="{cause}"}}') == 1.0:
                    del pending[port]
            time.sleep(0.5)
        assert not pending, {p: a[1].log()[-2000:] for p, a in pending.items()}
        urls = {re.search(r'"hint_url": "([^"]+)"', a[1].log()).group(1) for a in agents.values()}
        assert len(urls) == 2, "each simulated node has its own hint API"
    finally:
        for _, proc in agents.values():
            proc.terminate()
            proc.wait(timeout=10)


def humanize_duration(v: float) -> str:
    """Prometheus' humanizeDuration for values of a minute or more (what the alert's description shows)."""
    seconds = int(v)
    minutes, hours = seconds // 60 % 60, seconds // 3600
    return f"{hours}h {minutes}m {seconds % 60}s" if hours else f"{minutes}m {seconds % 60}s"


@pytest.mark.timeout(300)
def test_a_hung_nas_pages_with_the_shipped_rules_and_production_probe_settings(tmp_path):
    """The agent on a hung NAS with the default probe interval (15 s) and timeout (10 s): the age
    of the hang grows through every timeout, a real Prometheus with the shipped rules fires
    StokerNasMountHung, and promtool agrees on the agent's own timeline."""
    config = tmp_path / "stoker.toml"
    config.write_text("[sim]\nshorten = false\n")
    port = free_port()
    agent = start_agent_process("--simulate", "nas-hang", "--listen", f"127.0.0.1:{port}", "--config", str(config))
    timeline: list[tuple[float, float]] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        static = f'      - targets: ["127.0.0.1:{port}"]\n        labels:\n          node: n1\n'
        with prometheus([], scrape_interval="5s", rule_files=[str(RULES)], static_configs=static) as prom:
            started = time.monotonic()
            fired = None
            while time.monotonic() - started < 200 and fired is None:
                value = metric(port, "stoker_nas_probe_inflight_seconds", '{mountpoint="/mnt/data"}')
                timeline.append((time.monotonic() - started, value or 0.0))
                alerts = prom.query('ALERTS{alertname="StokerNasMountHung",alertstate="firing",mountpoint="/mnt/data"}')
                if alerts:
                    fired = time.monotonic() - started
                    assert alerts[0]["metric"]["severity"] == "critical" and alerts[0]["metric"]["node"] == "n1"
                time.sleep(5 - (time.monotonic() - started) % 5)
            assert fired is not None, f"never fired; the agent's timeline: {timeline}"
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    hung = [(t, v) for t, v in timeline if v > 0]
    assert hung and hung[-1][1] > 60, timeline
    assert all(b >= a for (_, a), (_, b) in zip(hung, hung[1:])), f"the hang's age went back: {hung}"
    promtool_on_the_timeline(tmp_path, [v for _, v in timeline])


def promtool_on_the_timeline(tmp_path: Path, values: list[float]) -> None:
    """The recorded timeline (one value per 5 s) as promtool input: the alert fires once the age
    has been above 30 s for a minute, and not before."""
    ints = [int(v) for v in values]
    first_over = next(i for i, v in enumerate(ints) if v > 30)
    fire_at = (first_over + 12) * 5  # `for: 1m` at a 5 s evaluation interval
    assert fire_at <= (len(ints) - 1) * 5, f"the recording is too short: {ints}"
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "StokerNasMountHung")
    runbook = rule["annotations"]["runbook_url"]
    test = {
        "rule_files": [str(RULES)], "evaluation_interval": "5s",
        "tests": [{"interval": "5s",
                   "input_series": [{"series": 'stoker_nas_probe_inflight_seconds{mountpoint="/mnt/data",node="n1"}',
                                     "values": " ".join(map(str, ints))}],
                   "alert_rule_test": [
                       {"eval_time": f"{fire_at - 5}s", "alertname": "StokerNasMountHung", "exp_alerts": []},
                       {"eval_time": f"{fire_at}s", "alertname": "StokerNasMountHung", "exp_alerts": [{
                           "exp_labels": {"node": "n1", "mountpoint": "/mnt/data", "severity": "critical"},
                           "exp_annotations": {
                               "summary": "NFS mount /mnt/data on n1 does not answer.",
                               "description": f"A NAS probe on /mnt/data has been unanswered for "
                                              f"{humanize_duration(ints[fire_at // 5])}. On a hard mount every "
                                              "process touching it is blocked.",
                               "runbook_url": runbook}}]}]}]}
    path = tmp_path / "hang_test.yml"
    path.write_text(json.dumps(test))
    result = subprocess.run([need_binary("promtool"), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr + f"\ntimeline: {ints}"
