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

    def alerts(self) -> list[dict]:
        """The alerts the server holds (pending and firing), as its /api/v1/alerts lists them."""
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=10) as resp:
            return json.load(resp)["data"]["alerts"]

    def targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as resp:
            return json.load(resp)["data"]["activeTargets"]


@contextmanager
def prometheus(targets: list[str], scrape_interval: str = "1s", rule_files: list[str] | None = None,
               extra_config: str = "", static_configs: str | None = None, prelude: str = "",
               job_body: bool = False, config_text: str | None = None):
    """A Prometheus on loopback scraping `targets` (or the `static_configs` YAML given); `config_text`: this
    whole configuration instead."""
    binary = need_binary("prometheus")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        rules = "".join(f"  - {r}\n" for r in rule_files or [])
        cfg.write_text(
            f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
            + prelude + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n  - job_name: stoker\n" + ("" if job_body else "    static_configs:\n")
            + (static_configs or f"      - targets: {json.dumps(targets)}\n") + extra_config
            if config_text is None else config_text)
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
    """An HTTP receiver for Alertmanager's webhook: keeps every alert it is sent, and when each alert first came
    firing and resolved (`arrived`, `resolved`: (alertname, node, job_id, cause) -> (time.time(), the alert))."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.alerts: list[dict] = []
        self.arrived: dict[tuple, tuple[float, dict]] = {}
        self.resolved: dict[tuple, tuple[float, dict]] = {}
        received, firsts = self.alerts, {"firing": self.arrived, "resolved": self.resolved}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.extend(body["alerts"])
                for a in body["alerts"]:
                    key = tuple(a["labels"].get(k) for k in ("alertname", "node", "job_id", "cause"))
                    firsts.get(a.get("status"), {}).setdefault(key, (time.time(), a))
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
def alertmanager(webhook_url: str, config_text: str | None = None):
    """Alertmanager on loopback sending every alert to `webhook_url`; `config_text`: this configuration instead."""
    binary = need_binary("prometheus-alertmanager")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "alertmanager.yml"
        cfg.write_text(config_text or (
            "route:\n  receiver: hook\n  group_by: [alertname, node]\n  group_wait: 1s\n  group_interval: 1s\n"
            "  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n"
            f"      - url: {webhook_url}\n        send_resolved: false\n"))
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}",
             "--cluster.listen-address=", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30)
            yield f"127.0.0.1:{port}"
        finally:
            stop(proc)


# -- VictoriaMetrics (Debian's victoria-metrics package: victoria-metrics, vmagent, vmalert) ------------

VICTORIAMETRICS = Path(__file__).resolve().parent.parent / "packaging" / "victoriametrics"


def shipped_args(name: str) -> list[str]:
    """The flags of a shipped /etc/default file (packaging/victoriametrics/NAME), split on spaces as
    systemd splits `$ARGS`."""
    import shlex
    env = {}
    for line in (VICTORIAMETRICS / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value))
    return env["ARGS"].split()


def flag_name(arg: str) -> str:
    return arg.lstrip("-").partition("=")[0]


def with_flags(args: list[str], **flags: str | list[str] | None) -> list[str]:
    """`args` with each named flag (dots as `__`: remoteWrite__url) replaced by the value(s) given, or
    dropped for None; flags not in `args` are appended."""
    names = {k.replace("__", "."): v for k, v in flags.items()}
    out = [a for a in args if flag_name(a) not in names]
    for name, value in names.items():
        for v in ([] if value is None else [value] if isinstance(value, str) else value):
            out.append(f"-{name}={v}" if v != "" else f"-{name}")
    return out


def own_metrics(url: str) -> dict[str, float]:
    """A VictoriaMetrics component's own /metrics, label sets kept in the key: {'name{labels}': value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


class VictoriaMetrics(Prometheus):
    """VictoriaMetrics single-node: the Prometheus query API (MetricsQL) at `url`, plus its own paths."""

    def __init__(self, url: str, data: Path, proc: subprocess.Popen):
        super().__init__(url)
        self.data = data
        self.proc = proc
        self.write_url = f"{url}/api/v1/write"

    def flush(self) -> None:
        """Make everything received searchable and on disk now (/internal/force_flush)."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30).read()

    def metrics(self) -> dict[str, float]:
        return own_metrics(self.url)


def _start(binary: str, args: list[str], ready: str, tmp: str, name: str) -> subprocess.Popen:
    with open(Path(tmp) / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(ready, timeout=30)
    except TimeoutError:
        stop(proc)
        raise AssertionError(f"{name} did not start: {(Path(tmp) / f'{name}.log').read_text()[-2000:]}") from None
    return proc


@contextmanager
def victoria_metrics(args: list[str] | None = None, data: str | None = None):
    """victoria-metrics on loopback with `args` (e.g. shipped_args("victoria-metrics.default")), its data in a
    temporary directory (or `data`)."""
    binary = need_binary("victoria-metrics")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(data or f"{tmp}/data")
        flags = with_flags(args or [], storageDataPath=str(path), httpListenAddr=f"127.0.0.1:{port}",
                           loggerLevel="WARN")
        proc = _start(binary, flags, f"http://127.0.0.1:{port}/health", tmp, "victoria-metrics")
        try:
            yield VictoriaMetrics(f"http://127.0.0.1:{port}", path, proc)
        finally:
            stop(proc)


@contextmanager
def vmagent(scrape_config: str, remote_write_url: str, args: list[str] | None = None):
    """vmagent on loopback scraping with the YAML `scrape_config`, writing to `remote_write_url`; yields its URL."""
    binary = need_binary("vmagent")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "vmagent.yml"
        cfg.write_text(scrape_config)
        flags = with_flags(args or [], promscrape__config=str(cfg), httpListenAddr=f"127.0.0.1:{port}",
                           remoteWrite__url=remote_write_url, remoteWrite__tmpDataPath=f"{tmp}/buffer",
                           loggerLevel="WARN")
        proc = _start(binary, flags, f"http://127.0.0.1:{port}/health", tmp, "vmagent")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)


def vm_url(base: str, shipped: str) -> str:
    """`shipped` (a URL of a shipped flag) on `base`'s scheme and address, its path and query kept."""
    parts = urllib.parse.urlsplit(shipped)
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(base)[:2] + parts[2:])


@contextmanager
def vmalert(rule_files: list[str], datasource_url: str, notifier_url: str | None = None,
            args: list[str] | None = None):
    """vmalert on loopback evaluating `rule_files` against the VictoriaMetrics at `datasource_url`, writing
    recording rules and ALERTS back to it, notifying the Alertmanager at `notifier_url` (host:port). With the
    shipped flags, their URLs keep their paths and queries (extra_label) on these addresses. Yields a
    Prometheus-like handle on vmalert's own API (`rules()`)."""
    binary = need_binary("vmalert")
    port = free_port()
    args = args or []
    shipped = {flag_name(a): a.partition("=")[2] for a in args}
    ds = vm_url(datasource_url, shipped.get("datasource.url", datasource_url))
    flags = {"rule": rule_files, "httpListenAddr": f"127.0.0.1:{port}", "datasource.url": ds,
             "remoteWrite.url": vm_url(datasource_url, shipped.get("remoteWrite.url", datasource_url)),
             "remoteRead.url": vm_url(datasource_url, shipped.get("remoteRead.url", datasource_url)),
             "notifier.url": f"http://{notifier_url}" if notifier_url else None, "loggerLevel": "WARN"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = _start(binary, with_flags(args, **{k.replace(".", "__"): v for k, v in flags.items()}),
                      f"http://127.0.0.1:{port}/health", tmp, "vmalert")
        try:
            yield Prometheus(f"http://127.0.0.1:{port}")
        finally:
            stop(proc)
