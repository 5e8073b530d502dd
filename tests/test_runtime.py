"""The runtime: supervision, deadlines, the HTTP side, shutdown."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker import config
from stoker.agent.collector import Collector
from stoker.agent.platform import Platform
from stoker.agent.runtime import Agent
from stoker.agent.supervisor import Supervisor
from stoker.agent.worker import CollectorError, Worker
from stoker.exporters.exposition import Exposition
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.node import SimNode
from tests.conftest import fetch, free_port, start_agent_process, wait_http


def sample_value(body: bytes, name: str, **labels) -> float | None:
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class Flaky(Collector):
    name = "flaky"
    interval = 0.05

    def __init__(self):
        self.calls = 0

    async def cycle(self):
        self.calls += 1
        if self.calls <= 2:
            raise RuntimeError("boom")
        return ["one_file"] if self.calls == 3 else []

    def families(self):
        return []


async def test_exception_in_a_collector_is_counted_and_retried():
    exposition = Exposition()
    flaky = Flaky()
    sup = Supervisor([flaky], exposition, lambda: {"version": "t", "nvml_version": "", "driver_version": ""})
    await sup.start()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if flaky.calls >= 4:
            break
    await sup.stop()
    body = exposition.body()
    assert sample_value(body, "stoker_collector_errors_total", collector="flaky", reason="RuntimeError") == 2
    assert sample_value(body, "stoker_collector_errors_total", collector="flaky", reason="one_file") == 1
    assert sample_value(body, "stoker_collector_up", collector="flaky") == 1


async def test_worker_deadline_and_hung_call():
    worker = Worker("t")
    release = asyncio.Event()
    import threading
    gate = threading.Event()
    with pytest.raises(CollectorError) as err:
        await worker.call(gate.wait, timeout=0.1)
    assert err.value.reason == "timeout"
    with pytest.raises(CollectorError) as err:
        await worker.call(lambda: 1, timeout=0.1)
    assert err.value.reason == "hung"
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0.01)
        try:
            assert await worker.call(lambda: 42, timeout=1) == 42
            break
        except CollectorError:
            continue
    else:
        pytest.fail("worker never recovered after the hung call returned")
    worker.close()
    del release


def _agent(fake, **agent) -> Agent:
    cfg = config.load(overrides={"agent": {"listen": "127.0.0.1:0", "interval": 0.1, **agent},
                                 "gpu": {"call_timeout": 0.3}, "rdma": {"enabled": False},
                                 "netdev": {"enabled": False}})
    return Agent(cfg, Platform(nvml=fake, links=None, open_ethtool=None))


async def test_hung_driver_fails_the_cycle_but_not_the_endpoint():
    fake = FakeNVML(SimNode("healthy"))
    agent = _agent(fake)
    await agent.start()
    try:
        base = f"http://127.0.0.1:{agent.port}"
        await asyncio.sleep(0.35)
        fake.hang.set()
        await asyncio.sleep(1.0)
        started = time.perf_counter()
        status, body, _ = await fetch(f"{base}/metrics")
        scrape_s = time.perf_counter() - started
        assert status == 200 and scrape_s < 1.0
        assert sample_value(body, "stoker_collector_up", collector="gpu") == 0
        assert sample_value(body, "stoker_collector_errors_total", collector="gpu", reason="timeout") >= 1
        assert sample_value(body, "stoker_collector_errors_total", collector="gpu", reason="hung") >= 1
        status, body, _ = await fetch(f"{base}/healthz")
        assert status == 503 and json.loads(body)["stale_collectors"] == ["gpu"]
        fake.hang_release.set()
        fake.hang.clear()
        for _ in range(50):
            await asyncio.sleep(0.1)
            status, body, _ = await fetch(f"{base}/healthz")
            if status == 200:
                break
        assert status == 200
    finally:
        fake.hang_release.set()
        await agent.stop()


async def test_stop_returns_promptly_while_the_driver_hangs():
    fake = FakeNVML(SimNode("healthy"))
    agent = _agent(fake)
    await agent.start()
    await asyncio.sleep(0.3)
    fake.hang.set()
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    await agent.stop()
    assert time.perf_counter() - started < 5.0
    fake.hang_release.set()


async def test_metrics_gzip_and_healthz():
    fake = FakeNVML(SimNode("healthy"))
    agent = _agent(fake)
    await agent.start()
    try:
        await asyncio.sleep(0.4)
        base = f"http://127.0.0.1:{agent.port}"
        status, body, headers = await fetch(f"{base}/metrics", headers={"Accept-Encoding": "gzip"},
                                            auto_decompress=False)
        assert status == 200 and headers["Content-Encoding"] == "gzip"
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = gzip.decompress(body)
        assert sample_value(text, "stoker_gpu_up", gpu="7") == 1
        status, body, _ = await fetch(f"{base}/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
    finally:
        await agent.stop()


async def test_library_missing_keeps_the_agent_running():
    fake = FakeNVML(SimNode("healthy"))
    fake.library_missing = True
    agent = _agent(fake)
    await agent.start()
    try:
        await asyncio.sleep(0.4)
        status, body, _ = await fetch(f"http://127.0.0.1:{agent.port}/metrics")
        assert status == 200
        assert sample_value(body, "stoker_collector_up", collector="gpu") == 0
        assert sample_value(body, "stoker_collector_errors_total", collector="gpu", reason="library_not_found") >= 1
        assert sample_value(body, "stoker_gpu_up", gpu="0") is None
    finally:
        await agent.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_process_within_5_seconds(sig):
    port = free_port()
    proc = start_agent_process("--simulate", "--listen", f"127.0.0.1:{port}", "--log-format", "json")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        started = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=5)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0
        lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
        assert {"stoker started", "stoker stopped"} <= {line["event"] for line in lines}
    finally:
        proc.kill()
