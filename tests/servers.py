"""Real Prometheus (and later Alertmanager, node_exporter) started on loopback for tests."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port, need_binary, wait_http


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as resp:
            data = json.load(resp)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def wait_for(self, expr: str, predicate, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{expr} never satisfied the condition; last result {result}")

    def rules(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=10) as resp:
            return json.load(resp)["data"]["groups"]

    def targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as resp:
            return json.load(resp)["data"]["activeTargets"]


@contextmanager
def prometheus(targets: list[str], scrape_interval: str = "1s", rule_files: list[str] | None = None,
               extra_config: str = "", static_configs: str | None = None):
    """A Prometheus on loopback scraping `targets` (or the `static_configs` YAML given)."""
    binary = need_binary("prometheus")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        rules = "".join(f"  - {r}\n" for r in rule_files or [])
        cfg.write_text(
            f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n  - job_name: stoker\n    static_configs:\n"
            + (static_configs or f"      - targets: {json.dumps(targets)}\n") + extra_config)
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30)
            yield Prometheus(f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
