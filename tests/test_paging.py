"""The paging path end to end: simulated agents -> real Prometheus with the shipped rules ->
real Alertmanager -> a webhook receiver (the pager)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, start_agent_process, wait_http
from tests.servers import Webhook, alertmanager, prometheus

pytestmark = pytest.mark.slow
RULES = Path(__file__).resolve().parent.parent / "alerts" / "stoker.rules.yml"
NODES = {"n-storage": "storage-starved", "n-ckpt": "checkpoint-stall", "n-healthy": "healthy"}


def fast_rules(tmp_path: Path) -> str:
    """The shipped rules with every `for:` cut to 5 s, so the path is exercised in seconds.
    The real durations are covered by promtool's unit tests (alerts/tests/)."""
    path = tmp_path / "stoker.rules.yml"
    path.write_text(re.sub(r"(\n\s+for: )\S+", r"\g<1>5s", RULES.read_text()))
    return str(path)


def test_storage_starvation_and_stalled_checkpoint_page_healthy_node_does_not(tmp_path):
    ports = {node: free_port() for node in NODES}
    agents = [start_agent_process("--simulate", scenario, "--listen", f"127.0.0.1:{ports[node]}")
              for node, scenario in NODES.items()]
    hook = Webhook()
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/metrics")
        static = "".join(f'      - targets: ["127.0.0.1:{p}"]\n        labels: {{node: "{n}"}}\n'
                         for n, p in ports.items())
        with alertmanager(hook.url) as am:
            alerting = f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{am}\"]\n"
            with prometheus([], rule_files=[fast_rules(tmp_path)], static_configs=static, extra_config="",
                            prelude=alerting):
                wanted = {("StokerGpusStarvedByStorage", "n-storage"), ("StokerCheckpointStalled", "n-ckpt")}
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    got = {(a["labels"]["alertname"], a["labels"]["node"]) for a in hook.alerts}
                    if wanted <= got:
                        break
                    time.sleep(1)
                by_key = {(a["labels"]["alertname"], a["labels"]["node"]): a for a in hook.alerts}
                assert wanted <= set(by_key), f"pages received: {sorted(by_key)}"
                storage = by_key[("StokerGpusStarvedByStorage", "n-storage")]
                assert storage["labels"]["severity"] == "critical" and storage["status"] == "firing"
                assert storage["annotations"]["runbook_url"].endswith("#stokergpusstarvedbystorage")
                assert "n-storage" in storage["annotations"]["summary"]
                assert by_key[("StokerCheckpointStalled", "n-ckpt")]["labels"]["mountpoint"] == "/mnt/checkpoints"
                assert not [a for a in hook.alerts if a["labels"].get("node") == "n-healthy"], \
                    "the healthy node paged"
    finally:
        hook.close()
        for a in agents:
            a.terminate()
            a.wait(timeout=10)
