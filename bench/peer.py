"""Stoker against node_exporter on the same sysfs tree, measured in the same run.

Both serve the RDMA counters of the full XE9680 fixture (tests/fixtures/sysfs/xe9680)
and the NFS mountstats of tests/fixtures/procfs/node: node_exporter (`--collector.infiniband
--collector.mountstats`) reads the trees on every scrape; Stoker reads them once per cycle
and serves a cached exposition. Reported per concurrency: scrape latency
p50/p99 for each, CPU seconds per 1,000 scrapes, resident memory, and the
ratios Stoker / node_exporter. Also the RDMA collector's own sampling cost.

    python -m bench.peer [--concurrency 1 10 50] [--requests 3000] [--client wrk|python] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, process_cpu, rss_bytes, summary_ms
from bench.scrape import free_port, measure, wait_http
from stoker.sources.rdma import RdmaSource

ROOT = Path(__file__).resolve().parent.parent
SYSFS = ROOT / "tests" / "fixtures" / "sysfs" / "xe9680"
PROCFS = ROOT / "tests" / "fixtures" / "procfs" / "node"


def sampling_cost(cycles: int) -> dict:
    source = RdmaSource(str(SYSFS))
    cpu = []
    for _ in range(cycles):
        t0 = time.thread_time()
        source.sample()
        cpu.append(time.thread_time() - t0)
    s = summary_ms(cpu)
    return {"rdma_cycle_cpu": s, "rdma_core_share_at_1s": round(s["mean_ms"] / 1000, 5)}


def start_servers(tmp: str) -> tuple[subprocess.Popen, subprocess.Popen, int, int]:
    ne_port, st_port = free_port(), free_port()
    config = Path(tmp) / "stoker.toml"
    config.write_text("[gpu]\nenabled = false\n[netdev]\nenabled = false\n")
    ne = subprocess.Popen(["prometheus-node-exporter", f"--path.sysfs={SYSFS}", f"--path.procfs={PROCFS}",
                           "--collector.disable-defaults", "--collector.infiniband", "--collector.mountstats",
                           f"--web.listen-address=127.0.0.1:{ne_port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    st = subprocess.Popen([sys.executable, "-m", "stoker", "run", "--config", str(config), "--sysfs-root",
                           str(SYSFS), "--procfs-root", str(PROCFS), "--listen", f"127.0.0.1:{st_port}",
                           "--log-format", "json"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{ne_port}/metrics")
    wait_http(f"http://127.0.0.1:{st_port}/metrics")
    return ne, st, ne_port, st_port


def run(concurrencies: list[int], requests: int, client: str, cycles: int = 300) -> dict:
    result: dict = {"client": client, "tree": "tests/fixtures/sysfs/xe9680 (8 RoCE ports) and "
                    "tests/fixtures/procfs/node (3 NFS mounts)", **sampling_cost(cycles)}
    with tempfile.TemporaryDirectory() as tmp:
        ne, st, ne_port, st_port = start_servers(tmp)
        try:
            time.sleep(1.5)
            rows = []
            for c in concurrencies:
                row = {"concurrency": c}
                for name, proc, port in (("node_exporter", ne, ne_port), ("stoker", st, st_port)):
                    url = f"http://127.0.0.1:{port}/metrics"
                    measure(client, url, c, min(200, requests))  # warm-up
                    cpu0 = process_cpu(proc.pid)
                    m = measure(client, url, c, requests)
                    row[name] = {**m, "cpu_s_per_1000_scrapes": round((process_cpu(proc.pid) - cpu0) / m["n"] * 1000, 4),
                                 "rss_bytes": rss_bytes(proc.pid)}
                row["p50_ratio_stoker_over_node_exporter"] = round(row["stoker"]["p50_ms"] / row["node_exporter"]["p50_ms"], 3)
                row["p99_ratio_stoker_over_node_exporter"] = round(row["stoker"]["p99_ms"] / row["node_exporter"]["p99_ms"], 3)
                row["cpu_ratio_stoker_over_node_exporter"] = round(
                    row["stoker"]["cpu_s_per_1000_scrapes"] / max(1e-9, row["node_exporter"]["cpu_s_per_1000_scrapes"]), 3)
                rows.append(row)
            result["scrapes"] = rows
        finally:
            for proc in (ne, st):
                proc.terminate()
                proc.wait(timeout=10)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("peer", run(args.concurrency, args.requests, args.client), args.out)


if __name__ == "__main__":
    main()
