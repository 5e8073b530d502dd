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


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


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
               extra_config: str = "", static_configs: str | None = None, prelude: str = "",
               job_body: bool = False):
    """A Prometheus on loopback scraping `targets` (or the `static_configs` YAML given)."""
    binary = need_binary("prometheus")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        rules = "".join(f"  - {r}\n" for r in rule_files or [])
        cfg.write_text(
            f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
            + prelude + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n  - job_name: stoker\n" + ("" if job_body else "    static_configs:\n")
            + (static_configs or f"      - targets: {json.dumps(targets)}\n") + extra_config)
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30)
            yield Prometheus(f"http://127.0.0.1:{port}")
        finally:
            stop(proc)


class Webhook:
    """An HTTP receiver for Alertmanager's webhook: keeps every alert it is sent."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.alerts: list[dict] = []
        received = self.alerts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.extend(body["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@contextmanager
def alertmanager(webhook_url: str):
    binary = need_binary("prometheus-alertmanager")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "alertmanager.yml"
        cfg.write_text(
            "route:\n  receiver: hook\n  group_by: [alertname, node]\n  group_wait: 1s\n  group_interval: 1s\n"
            "  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n"
            f"      - url: {webhook_url}\n        send_resolved: false\n")
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}",
             "--cluster.listen-address=", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30)
            yield f"127.0.0.1:{port}"
        finally:
            stop(proc)
