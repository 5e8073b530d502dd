"""Detection latency: from the moment a simulated fault begins to the moment the verdict
metric changes, and to the moment the alert fires in a real Prometheus with the shipped rules.

Each scenario runs a real agent (in this process, so the simulated fault's start is
known exactly) at a 1 s interval. The verdict is read from the agent's own state every
50 ms; the alert from a Prometheus scraping the agent every `--scrape` with the
shipped rules (their `for:` durations scaled by `--for-scale`: 1.0 is as shipped).

    python -m bench.detection [--scenarios storage-starved ...] [--alert storage-starved] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import emit
from bench.fleet import query
from bench.scrape import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "stoker.rules.yml"
EXPECTED = {"storage-starved": "storage", "network-congested": "network", "network-lossy": "network",
            "port-down": "network", "host-starved": "host", "nas-hang": "storage", "checkpoint": "checkpoint",
            "checkpoint-stall": "checkpoint"}
ALERT = {"storage": "StokerGpusStarvedByStorage", "network": "StokerGpusStarvedByNetwork",
         "host": "StokerGpusStarvedByHost", "checkpoint": "StokerCheckpointStalled"}


def scaled_rules(path: Path, scale: float) -> Path:
    def scale_for(m: re.Match) -> str:
        value, unit = float(m.group(2)), m.group(3)
        seconds = value * {"s": 1, "m": 60, "h": 3600}[unit] * scale
        return f"{m.group(1)}{max(1, round(seconds))}s"
    out = path / "rules.yml"
    out.write_text(re.sub(r"(\n\s+for: )(\d+)([smh])", scale_for, RULES.read_text()))
    return out


async def one(scenario: str, alert: bool, for_scale: float, scrape: str, timeout: float) -> dict:
    from stoker import config, logs
    from stoker.agent.runtime import Agent
    from stoker.sim.scenarios import fault_start
    from stoker.sim.simulation import Simulation

    logs.configure("json", level=40)
    expected = EXPECTED[scenario]
    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(scenario, f"{tmp}/sim")
        port = free_port()
        cfg = sim.configure(config.load(overrides={"agent": {"listen": f"127.0.0.1:{port}", "interval": 1.0},
                                                   "checkpoint": {"listen": "127.0.0.1:0"}}))
        agent = Agent(cfg, sim.platform())
        await agent.start()
        fault_at = sim.node.started + fault_start(scenario)
        prom = None
        if alert:
            prom_port = free_port()
            Path(tmp, "prometheus.yml").write_text(
                f"global:\n  scrape_interval: {scrape}\n  evaluation_interval: {scrape}\n"
                f"rule_files:\n  - {scaled_rules(Path(tmp), for_scale)}\n"
                f"scrape_configs:\n  - job_name: stoker\n    static_configs:\n"
                f'      - targets: ["127.0.0.1:{port}"]\n        labels: {{node: "bench"}}\n')
            prom = subprocess.Popen(["prometheus", f"--config.file={tmp}/prometheus.yml",
                                     f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{prom_port}",
                                     "--log.level=error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{prom_port}/-/ready", 60)
        result = {"scenario": scenario, "cause": expected}
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and "verdict_after_fault_s" not in result:
                if agent.verdicts.verdict.cause == expected and time.monotonic() >= fault_at:
                    result["verdict_after_fault_s"] = round(time.monotonic() - fault_at, 2)
                await asyncio.sleep(0.05)
            if prom is not None:
                name = ALERT[expected]
                while time.monotonic() < deadline and "alert_after_fault_s" not in result:
                    firing = await asyncio.to_thread(
                        query, f"http://127.0.0.1:{prom_port}", f'ALERTS{{alertname="{name}",alertstate="firing"}}')
                    if firing:
                        result["alert_after_fault_s"] = round(time.monotonic() - fault_at, 1)
                        result["alert"] = name
                    await asyncio.sleep(0.5)
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)
            await agent.stop()
        return result


def run(scenarios: list[str], alert_scenarios: list[str], for_scale: float = 1.0, scrape: str = "15s",
        timeout: float = 400) -> dict:
    rows = [asyncio.run(one(s, s in alert_scenarios, for_scale, scrape, timeout)) for s in scenarios]
    return {"interval_s": 1.0, "scrape_interval": scrape, "for_scale": for_scale, "scenarios": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(EXPECTED))
    parser.add_argument("--alert", nargs="*", default=["storage-starved", "network-congested"])
    parser.add_argument("--for-scale", type=float, default=1.0)
    parser.add_argument("--scrape", default="15s")
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("detection", run(args.scenarios, args.alert, args.for_scale, args.scrape), args.out)


if __name__ == "__main__":
    main()
