"""Fleet scale: many simulated nodes, each a full agent, scraped by one real Prometheus
with the shipped recording and alerting rules.

A worker process serves `--per-process` simulated nodes, each a complete `Agent`
(its own simulated node, collectors, verdicts and HTTP port), in one event loop.
For each fleet size the harness measures, from Prometheus' own metrics: series
per node, head series, rule evaluation time, scrape durations, and Prometheus'
memory; then extrapolates linearly to 1,000 and 10,000 nodes.

    python -m bench.fleet [--nodes 5 10 20 40] [--per-process 10] [--seconds 60] [--hw-counters default|all]
                          [--out FILE]

bench/fleet_vm.py measures the same fleet on VictoriaMetrics (vmagent, vmalert) for docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.common import emit, thread_sum_cpu
from bench.scrape import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "stoker.rules.yml"
SCENARIOS = ("healthy", "storage-starved", "network-congested", "checkpoint", "host-starved")
NODE_INTERVAL = 5.0  # seconds between samples on a fleet node: Prometheus scrapes at 15 s anyway


async def serve_nodes(ports: list[int], interval: float, hw_counters: str = "default") -> None:
    from stoker import config, logs
    from stoker.agent.runtime import Agent, run_side_by_side
    from stoker.sim.simulation import Simulation

    logs.configure("json", level=40)
    agents = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with tempfile.TemporaryDirectory() as tmp:  # SIGTERM ends the agents, then removes their trees
        for i, port in enumerate(ports):
            sim = Simulation(SCENARIOS[i % len(SCENARIOS)], f"{tmp}/{i}")
            sim_cfg = sim.configure(config.load(overrides={
                "agent": {"listen": f"127.0.0.1:{port}", "interval": interval},
                "rdma": {"hw_counters": hw_counters}, "checkpoint": {"listen": "127.0.0.1:0"}}))
            agents.append(Agent(sim_cfg, sim.platform()))
        await run_side_by_side(agents, stop)


def worker_main(ports: list[int], interval: float, hw_counters: str = "default") -> None:
    asyncio.run(serve_nodes(ports, interval, hw_counters))


def start_workers(nodes: int, per_process: int, hw_counters: str = "default",
                  interval: float = NODE_INTERVAL) -> tuple[list[int], list[subprocess.Popen]]:
    """`nodes` simulated nodes, `per_process` to a worker process: their ports and the workers."""
    ports: list[int] = []
    while len(ports) < nodes:  # the kernel hands a port closed a moment ago out again: never one twice
        port = free_port()
        if port not in ports:
            ports.append(port)
    workers = []
    for i in range(0, nodes, per_process):
        # a worker that fails says why in its log (one per worker, named after its first port)
        path = Path(tempfile.gettempdir()) / f"stoker-fleet-worker-{ports[i]}.log"
        with open(path, "wb") as log:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "bench.fleet", "--worker", "--interval", str(interval),
                 "--hw-counters", hw_counters, "--ports", *map(str, ports[i:i + per_process])],
                stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT))
        workers[-1].log_path = path  # type: ignore[attr-defined]
    return ports, workers


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        w.terminate()
    for w in workers:
        try:
            w.wait(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
        log = getattr(w, "log_path", None)
        if log is not None and log.exists() and not log.stat().st_size:
            log.unlink()


def query(url: str, expr: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=30) as resp:
        return json.load(resp)["data"]["result"]


def scalar(url: str, expr: str) -> float:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else float("nan")


def measure(nodes: int, per_process: int, seconds: float, scrape_interval: str, hw_counters: str = "default") -> dict:
    ports, workers = start_workers(nodes, per_process, hw_counters)
    prom_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        static = "".join(f'      - targets: ["127.0.0.1:{p}"]\n        labels: {{node: "node-{i:04d}"}}\n'
                         for i, p in enumerate(ports))
        (Path(tmp) / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
            f"rule_files:\n  - {RULES}\nscrape_configs:\n"
            f"  - job_name: prometheus\n    static_configs:\n      - targets: [\"127.0.0.1:{prom_port}\"]\n"
            f"  - job_name: stoker\n    static_configs:\n{static}")
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp}/prometheus.yml", f"--storage.tsdb.path={tmp}/data",
                                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=error"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{prom_port}"
        try:
            for p in ports:
                wait_http(f"http://127.0.0.1:{p}/metrics", timeout=120)
            wait_http(f"{url}/-/ready", timeout=60)
            cpu0, t0 = sum(thread_sum_cpu(w.pid) for w in workers), time.monotonic()
            time.sleep(seconds)
            nodes_cpu = (sum(thread_sum_cpu(w.pid) for w in workers) - cpu0) / (time.monotonic() - t0)
            up = scalar(url, 'sum(up{job="stoker"})')
            per_node = query(url, 'count by (node) ({job="stoker"})')
            series = [float(r["value"][1]) for r in per_node]
            return {
                "nodes": nodes, "nodes_up": up,
                # the worker processes: every simulated node's agent and simulator, all of them together
                "nodes_cpu_share_of_one_core": round(nodes_cpu, 4),
                "cpu_share_per_node": round(nodes_cpu / nodes, 5),
                "series_per_node": round(sum(series) / max(1, len(series)), 1),
                "head_series": scalar(url, "prometheus_tsdb_head_series"),
                "rule_eval_seconds": scalar(url, "sum(prometheus_rule_group_last_duration_seconds)"),
                "scrape_duration_avg_s": scalar(url, 'avg(scrape_duration_seconds{job="stoker"})'),
                "scrape_duration_max_s": scalar(url, 'max(scrape_duration_seconds{job="stoker"})'),
                "prometheus_rss_bytes": scalar(url, 'process_resident_memory_bytes{job="prometheus"}'),
                "samples_per_second": scalar(url, "rate(prometheus_tsdb_head_samples_appended_total[1m])"),
            }
        finally:
            prom.terminate()
            prom.wait(timeout=30)
            stop_workers(workers)


def extrapolate(rows: list[dict], scrape_seconds: float) -> dict:
    """Least-squares lines through the measured sizes, evaluated at 1,000 and 10,000 nodes."""
    def fit(key: str) -> tuple[float, float]:
        xs = [r["nodes"] for r in rows]
        ys = [r[key] for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs) or 1.0
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        return slope, my - slope * mx
    out = {}
    for target in (1000, 10000):
        est = {}
        for key in ("head_series", "rule_eval_seconds", "prometheus_rss_bytes"):
            slope, intercept = fit(key)
            est[key] = slope * target + intercept
        est["samples_per_second"] = est["head_series"] / scrape_seconds
        out[str(target)] = {k: float(f"{v:.4g}") for k, v in est.items()}
    return out


def run(sizes: list[int], per_process: int, seconds: float, scrape_interval: str = "15s",
        hw_counters: str = "default") -> dict:
    rows = [measure(n, per_process, seconds, scrape_interval, hw_counters) for n in sizes]
    scrape_seconds = float(scrape_interval.rstrip("s"))
    return {"scrape_interval": scrape_interval, "node_interval_s": NODE_INTERVAL, "hw_counters": hw_counters,
            "sizes": rows,
            "extrapolated": extrapolate(rows, scrape_seconds) if len(rows) >= 2 else {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--per-process", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", type=int, nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=NODE_INTERVAL, help=argparse.SUPPRESS)
    parser.add_argument("--hw-counters", default="default", choices=("default", "all"),
                        help="the nodes' [rdma] hw_counters")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker_main(args.ports, args.interval, args.hw_counters)
        return
    emit("fleet", run(args.nodes, args.per_process, args.seconds, args.scrape_interval, args.hw_counters), args.out)


if __name__ == "__main__":
    main()
