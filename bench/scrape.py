"""Scrape latency of a running agent under concurrent scrapers.

Starts `stoker run --simulate` in its own process and hits `/metrics` from
N concurrent connections, with `wrk` (Debian package; a C client, so the
2-core machine's Python client does not distort the server's latency) or, where
wrk is missing, an aiohttp client; `/healthz` (a constant-size JSON answer from the same
server) is measured in the same run as the reference, so the ratio says what
serving the exposition costs beyond the HTTP round trip itself.

The process_* families (the agent's CPU, memory and descriptors, read from /proc/self) are
measured by what they cost a scrape: agents with them and without (`[agent] process_metrics`)
take turns in the same run, and the ratio of their scrape latency and CPU per scrape says what
they add; their collection and rendering alone is timed in this process beside it, holding as
many descriptors as the agent, against prometheus-client's ProcessCollector.

    python -m bench.scrape [--concurrency 20] [--requests 2000] [--client wrk|python] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiohttp

from bench.common import emit, process_cpu, rss_bytes, summary_ms


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(url)


async def hammer(url: str, concurrency: int, requests: int, headers: dict | None = None) -> list[float]:
    latencies: list[float] = []
    per_client = max(1, requests // concurrency)

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return latencies


WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, concurrency: int, seconds: float, headers: dict | None = None) -> dict:
    """Latency percentiles (ms) and request count from `wrk --latency`."""
    cmd = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", url]
    for k, v in (headers or {}).items():
        cmd[1:1] = ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    pct = {int(p): float(v) * WRK_UNITS[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)$", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"p50_ms": round(pct[50], 4), "p99_ms": round(pct[99], 4), "n": total}


def start_agent(port: int, scenario: str = "healthy", extra: list[str] | None = None,
                process_metrics: bool = True) -> subprocess.Popen:
    """A simulated agent in its own process; its hint API on any free port, so several can run."""
    config = tempfile.NamedTemporaryFile("w", prefix="stoker-bench-", suffix=".toml", delete=False)
    config.write(f'[agent]\nprocess_metrics = {str(process_metrics).lower()}\n[checkpoint]\nlisten = "127.0.0.1:0"\n')
    config.close()
    return subprocess.Popen(
        [sys.executable, "-m", "stoker", "run", "--simulate", scenario, "--config", config.name,
         "--listen", f"127.0.0.1:{port}", "--log-format", "json", *(extra or [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})


def measure(client: str, url: str, concurrency: int, requests: int, headers: dict | None = None) -> dict:
    if client == "wrk":
        return wrk(url, concurrency, seconds=max(1.0, requests / 5000), headers=headers)
    return summary_ms(asyncio.run(hammer(url, concurrency, requests, headers)))


def run_agent(concurrency: int, requests: int, client: str, process_metrics: bool = True) -> dict:
    port = free_port()
    agent = start_agent(port, process_metrics=process_metrics)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/metrics")
        time.sleep(2.5)  # a few cycles so every series exists
        body = urllib.request.urlopen(f"{base}/metrics").read()
        fds = re.search(rb"^process_open_fds (\S+)$", body, re.M)
        asyncio.run(hammer(f"{base}/metrics", concurrency, min(200, requests)))  # warm-up
        cpu0 = process_cpu(agent.pid)
        m = measure(client, f"{base}/metrics", concurrency, requests)
        cpu_metrics = process_cpu(agent.pid) - cpu0
        gz = measure(client, f"{base}/metrics", concurrency, requests, {"Accept-Encoding": "gzip"})
        r = measure(client, f"{base}/healthz", concurrency, requests)
        return {
            "client": client,
            "concurrency": concurrency,
            "exposition_bytes": len(body),
            "series": sum(1 for line in body.decode().splitlines() if line and not line.startswith("#")),
            "process_series": sum(1 for line in body.decode().splitlines() if line.startswith("process_")),
            "open_fds": int(float(fds.group(1))) if fds else None,
            "metrics": m,
            "metrics_gzip": gz,
            "reference_healthz": r,
            "p99_metrics_over_healthz": round(m["p99_ms"] / r["p99_ms"], 3),
            "agent_cpu_s_per_1000_scrapes": round(cpu_metrics / m["n"] * 1000, 4),
            "agent_rss_bytes": rss_bytes(agent.pid),
        }
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def process_render_us(descriptors: int, calls: int = 1000) -> dict:
    """Microseconds to collect the process_* families and render them, ours (exporters/process.py)
    against prometheus-client's ProcessCollector, in this process holding as many descriptors as
    the agent: what a scrape pays when the agent's own chunk is rendered for it (at most once per
    scrape, after a cycle since the last; scrapes in between are served from memory)."""
    from prometheus_client import ProcessCollector

    from stoker.exporters.exposition import render
    from stoker.exporters.process import ProcessMetrics

    def timed(collector) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            render(collector.collect())
        return (time.perf_counter() - t0) / calls * 1e6

    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(max(0, descriptors - len(os.listdir("/proc/self/fd"))))]
    try:
        ours, theirs = timed(ProcessMetrics()), timed(ProcessCollector(registry=None))
    finally:
        for fd in held:
            os.close(fd)
    return {"descriptors": descriptors, "ours_us": round(ours, 1), "prometheus_client_us": round(theirs, 1),
            "ours_over_prometheus_client": round(ours / theirs, 3)}


def render_cost(samples: int = 200) -> dict:
    """What the process_* families add to the scrape Prometheus makes (one every 15 s: every chunk
    changed since the last, so the whole body is rendered for it): the simulated node's full agent in
    this process, its body rendered after marking every chunk changed, with the families and without
    them in turn (each first every other time), `samples` times each; the medians and their ratio."""
    import tempfile as tmp

    from stoker import config
    from stoker.agent.runtime import Agent
    from stoker.exporters.process import ProcessMetrics
    from stoker.sim.simulation import Simulation

    async def measure_in_loop() -> dict:
        with tmp.TemporaryDirectory() as root:
            sim = Simulation("healthy", root)
            cfg = sim.configure(config.load(overrides={"agent": {"listen": "127.0.0.1:0", "process_metrics": False},
                                                       "checkpoint": {"listen": "127.0.0.1:0"}}))
            agent = Agent(cfg, sim.platform())
            await agent.start(serve_http=False)
            try:
                await asyncio.sleep(2.5)  # every collector has cycled: every series exists
                supervisor, process = agent.supervisor, ProcessMetrics()
                times: dict[bool, list[float]] = {True: [], False: []}
                for i in range(samples):
                    for on in (True, False) if i % 2 else (False, True):  # the first of a pair renders slower
                        if on:
                            supervisor.registry.register(process)
                        for c in agent.collectors:  # as after a cycle of each: every chunk to render
                            agent.exposition.set_source(c.name, supervisor._chunks.get(c.name) or supervisor._chunk(c))
                        supervisor._render_self()
                        t0 = time.perf_counter()
                        body = agent.exposition.body()
                        times[on].append(time.perf_counter() - t0)
                        assert (b"\nprocess_open_fds " in body) == on
                        if on:
                            supervisor.registry.unregister(process)
            finally:
                await agent.stop()
        with_, without = (statistics.median(times[on]) * 1e3 for on in (True, False))
        return {"samples": samples, "body_ms_with": round(with_, 3), "body_ms_without": round(without, 3),
                "with_over_without": round(with_ / without, 4)}

    return asyncio.run(measure_in_loop())


def run(concurrency: int, requests: int, client: str, rounds: int = 2) -> dict:
    """The agent with its process_* families and without, in turns (`rounds` each): the first
    with them is the headline; the medians of both sides give the ratios. On a shared machine the
    load moves more than the families do: compare `each_round`, not one pair."""
    sides: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(rounds):
        for on in (True, False) if i % 2 == 0 else (False, True):  # each side first in every other round
            sides[on].append(run_agent(concurrency, requests, client, process_metrics=on))

    def median(on: bool, pick) -> float:
        return statistics.median(pick(r) for r in sides[on])

    figures = {"p50_ms": lambda r: r["metrics"]["p50_ms"], "p99_ms": lambda r: r["metrics"]["p99_ms"],
               "gzip_p99_ms": lambda r: r["metrics_gzip"]["p99_ms"],
               "cpu_s_per_1000_scrapes": lambda r: r["agent_cpu_s_per_1000_scrapes"]}
    on = {k: median(True, f) for k, f in figures.items()}
    off = {k: median(False, f) for k, f in figures.items()}
    render = process_render_us(sides[True][0]["open_fds"])
    return {**sides[True][0], "process_metrics": {
        "rounds": rounds, "series": sides[True][0]["process_series"], "on": on, "off": off,
        **{f"{k}_on_over_off": round(on[k] / off[k], 3) if off[k] else None for k in figures},
        "each_round": {side: [{k: f(r) for k, f in figures.items()} for r in sides[flag]]
                       for side, flag in (("on", True), ("off", False))},
        "collect_and_render": render,
        "collect_and_render_over_scrape_p50": round(render["ours_us"] / 1000 / on["p50_ms"], 4),
        "prometheus_scrape": render_cost()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    parser.add_argument("--rounds", type=int, default=2, help="turns of the agent with and without process_*")
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("scrape", run(args.concurrency, args.requests, args.client, args.rounds), args.out)


if __name__ == "__main__":
    main()
