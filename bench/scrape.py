"""Scrape latency of a running agent under concurrent scrapers.

Starts `stoker run --simulate` in its own process and hits `/metrics` from
N concurrent connections, with `wrk` (Debian package; a C client, so the
2-core machine's Python client does not distort the server's latency) or, where
wrk is missing, an aiohttp client; `/healthz` (a constant-size JSON answer from the same
server) is measured in the same run as the reference, so the ratio says what
serving the exposition costs beyond the HTTP round trip itself.

    python -m bench.scrape [--concurrency 20] [--requests 2000] [--client wrk|python] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
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


def start_agent(port: int, scenario: str = "healthy", extra: list[str] | None = None) -> subprocess.Popen:
    """A simulated agent in its own process; its hint API on any free port, so several can run."""
    config = tempfile.NamedTemporaryFile("w", prefix="stoker-bench-", suffix=".toml", delete=False)
    config.write('[checkpoint]\nlisten = "127.0.0.1:0"\n')
    config.close()
    return subprocess.Popen(
        [sys.executable, "-m", "stoker", "run", "--simulate", scenario, "--config", config.name,
         "--listen", f"127.0.0.1:{port}", "--log-format", "json", *(extra or [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})


def measure(client: str, url: str, concurrency: int, requests: int, headers: dict | None = None) -> dict:
    if client == "wrk":
        return wrk(url, concurrency, seconds=max(1.0, requests / 5000), headers=headers)
    return summary_ms(asyncio.run(hammer(url, concurrency, requests, headers)))


def run(concurrency: int, requests: int, client: str) -> dict:
    port = free_port()
    agent = start_agent(port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/metrics")
        time.sleep(2.5)  # a few cycles so every series exists
        body = urllib.request.urlopen(f"{base}/metrics").read()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python")
    parser.add_argument("--out")
    args = parser.parse_args()
    emit("scrape", run(args.concurrency, args.requests, args.client), args.out)


if __name__ == "__main__":
    main()
