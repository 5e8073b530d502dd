"""Stoker's own cost on the simulated node: CPU share, RSS and sampling jitter at 1 s and
0.1 s intervals, and how the cost of one cycle grows with GPUs, ports and mounts.

- `agent`: `stoker run --simulate healthy` in its own process for `seconds`; CPU share
  and RSS from /proc; jitter from the agent's own `stoker_collector_lag_seconds`
  histogram (how late each cycle started). The simulator runs inside that process
  (it writes the fake sysfs/procfs trees and plays the fake NVML): its own cost is
  measured alone in the same run (`simulator_alone`) so the agent's share can be
  told apart.
- `scaling`: one cycle of each collector (sample + render) in this process for
  1, 2, 4, 8, 16 GPUs, RDMA ports and NFS mounts, on the simulator's trees.

    python -m bench.cost [--seconds 20] [--sizes 1 2 4 8 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import urllib.request

from bench.common import emit, process_cpu, rss_bytes, summary_ms
from bench.scrape import free_port, start_agent, wait_http
from stoker.config import DEFAULT_NFS_OPERATIONS
from stoker.exporters import gpu as gpu_families
from stoker.exporters import netdev as netdev_families
from stoker.exporters import nfs as nfs_families
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import render
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.network import FakeEthtool, SimNetwork
from stoker.sim.node import SimNode
from stoker.sim.simulation import ADVANCE_EVERY, Simulation
from stoker.sim.storage import SimStorage
from stoker.sources.gpu import GpuSource
from stoker.sources.netdev import EthtoolReader, snapshot
from stoker.sources.nfs import NfsSource
from stoker.sources.rdma import RdmaSource

LAG = re.compile(r'^stoker_collector_lag_seconds_bucket\{collector="([^"]+)",le="([^"]+)"\} (\S+)$', re.M)


def lag_quantiles(body: str) -> dict[str, dict[str, float]]:
    """p50/p99 upper bounds of each collector's lag, from the histogram's buckets."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for name, le, count in LAG.findall(body):
        buckets.setdefault(name, []).append((float(le), float(count)))
    out = {}
    for name, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        q = {}
        for p in (50, 99):
            q[f"p{p}_le_s"] = next((le for le, c in rows if c >= total * p / 100), float("inf"))
        out[name] = {**q, "cycles": total}
    return out


def run_agent(interval: float, seconds: float) -> dict:
    port = free_port()
    agent = start_agent(port, "healthy", ["--interval", str(interval)])
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_http(url)
        time.sleep(2)
        cpu0, t0 = process_cpu(agent.pid), time.monotonic()
        time.sleep(seconds)
        cpu, wall = process_cpu(agent.pid) - cpu0, time.monotonic() - t0
        body = urllib.request.urlopen(url).read().decode()
        return {"interval_s": interval, "cpu_share_of_one_core": round(cpu / wall, 4),
                "rss_bytes": rss_bytes(agent.pid), "lag": lag_quantiles(body),
                "series": sum(1 for line in body.splitlines() if line and not line.startswith("#"))}
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def simulator_alone(seconds: float, interval: float = 1.0) -> dict:
    """The simulator's kernel-tree writes at the pace it keeps for an agent sampling every
    `interval` (once per cycle, at most every ADVANCE_EVERY), with no collector reading them."""
    with tempfile.TemporaryDirectory() as root:
        sim = Simulation("healthy", root)
        t0, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - t0 < seconds:
            sim.advance()
            time.sleep(max(ADVANCE_EVERY, interval))
        return {"cpu_share_of_one_core": round((time.process_time() - cpu0) / (time.monotonic() - t0), 4)}


def scaling(sizes: list[int], cycles: int) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as root:
            node = SimNode("healthy", gpu_count=n)
            network = SimNetwork(node, f"{root}/sys", ports=n)
            network.build()
            storage = SimStorage(node, f"{root}/proc", f"{root}/nas", "bench", extra_mounts=max(0, n - 2))
            storage.build()
            time.sleep(0.1)  # directories changed this recently are checked again each cycle (files.RACY_NS)
            gpu = GpuSource(FakeNVML(node))
            rdma = RdmaSource(f"{root}/sys")
            ethtool = EthtoolReader(lambda name: FakeEthtool(network, name))
            nfs = NfsSource(f"{root}/proc", DEFAULT_NFS_OPERATIONS, {})
            names = [p.netdev for p in network.ports]
            steps = {
                "gpu": lambda: render(gpu_families.families(gpu.sample())),
                "rdma": lambda: render(rdma_families.families(rdma.sample())),
                "netdev": lambda: render(netdev_families.families(snapshot(names, None, *ethtool.read(names)))),
                "nfs": lambda: render(nfs_families.families(nfs.sample())),
            }
            gpu.sample()
            row = {"size": n, "mounts": len(storage.mounts)}
            for name, step in steps.items():
                cpu = []
                for _ in range(cycles):
                    t0 = time.thread_time()
                    step()
                    cpu.append(time.thread_time() - t0)
                row[f"{name}_cycle_ms"] = summary_ms(cpu)["p50_ms"]
            row["total_cycle_ms"] = round(sum(row[f"{k}_cycle_ms"] for k in steps), 3)
            gpu.close()
            rows.append(row)
    return rows


def run(seconds: float, sizes: list[int], cycles: int = 30) -> dict:
    return {
        "agent": [run_agent(1.0, seconds), run_agent(0.1, seconds)],
        "simulator_alone": simulator_alone(min(seconds, 10)),
        "scaling": scaling(sizes, cycles),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("cost", run(args.seconds, args.sizes), args.out)


if __name__ == "__main__":
    sys.exit(main())
