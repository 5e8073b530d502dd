"""NAS probes: real child processes on real directories, and a mount that hangs (a FIFO)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker.agent.probes import ProbeCollector
from stoker.config import ProbesConfig, ProbeTarget
from stoker.exporters.exposition import render
from tests.conftest import free_port, start_agent_process, wait_http


def values(families, name: str) -> dict:
    text = render(families).decode()
    return {tuple(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name}


def plant_fifo(directory) -> str:
    """What a hung hard mount does to open(): block. A FIFO with no reader does the same."""
    path = os.path.join(directory, f".stoker-probe-{socket.gethostname()}")
    os.mkfifo(path)
    return path


async def run_cycles(collector: ProbeCollector, seconds: float, step: float = 0.1) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await collector.cycle()
        await asyncio.sleep(step)


async def probed(mountpoint: str, directory, seconds: float, interval: float) -> ProbeCollector:
    """A probe collector run for `seconds` against one directory, then closed."""
    config = ProbesConfig(targets=(ProbeTarget(mountpoint, str(directory)),), interval=interval, timeout=5,
                          size=65536)
    collector = ProbeCollector(0.1, config)
    try:
        await run_cycles(collector, seconds)
    finally:
        await collector.close()
    return collector


async def test_probe_measures_write_read_metadata(tmp_path):
    collector = await probed("/mnt/data", tmp_path, 2.0, 0.3)
    counts = values(collector.families(), "stoker_nas_probe_seconds_count")
    for probe in ("write", "read", "metadata"):
        assert counts[(("mountpoint", "/mnt/data"), ("probe", probe))] >= 2
    failures = values(collector.families(), "stoker_nas_probe_failures_total")
    assert set(failures.values()) == {0.0}
    assert os.listdir(tmp_path) == [], "probe files are removed"


async def test_files_left_by_a_killed_probe_do_not_fail_the_next_and_a_tag_keeps_probers_apart(tmp_path):
    from stoker.probe_child import probe
    host = socket.gethostname()
    (tmp_path / f".stoker-probe-{host}.meta").write_bytes(b"")  # the last probe was killed in metadata
    first = probe(str(tmp_path), 4096)
    assert all(isinstance(first[p], float) for p in ("write", "read", "metadata")), first
    (tmp_path / f".stoker-probe-{host}.meta").write_bytes(b"")  # the service's, mid-probe
    checked = probe(str(tmp_path), 4096, "check")
    assert all(isinstance(checked[p], float) for p in ("write", "read", "metadata")), checked
    assert os.listdir(tmp_path) == [f".stoker-probe-{host}.meta"], "the service's file is not the check's"


async def test_missing_directory_is_an_error_not_a_crash(tmp_path):
    collector = await probed("/mnt/gone", tmp_path / "nope", 1.0, 0.2)
    failures = values(collector.families(), "stoker_nas_probe_failures_total")
    assert failures[(("mountpoint", "/mnt/gone"), ("reason", "error"))] >= 3  # write, read, metadata


async def test_hung_probe_in_flight_grows_then_times_out_one_at_a_time(tmp_path):
    plant_fifo(tmp_path)
    config = ProbesConfig(targets=(ProbeTarget("/mnt/hung", str(tmp_path)),), interval=0.1, timeout=1.0)
    collector = ProbeCollector(0.1, config)
    ages = []
    try:
        for _ in range(8):
            await collector.cycle()
            ages.append(values(collector.families(), "stoker_nas_probe_inflight_seconds")[(("mountpoint", "/mnt/hung"),)])
            await asyncio.sleep(0.1)
        assert ages == sorted(ages) and ages[-1] > 0.5, ages
        spawned = collector.mounts[0].proc
        await run_cycles(collector, 1.5)
        failures = values(collector.families(), "stoker_nas_probe_failures_total")
        assert failures[(("mountpoint", "/mnt/hung"), ("reason", "timeout"))] >= 1
        assert spawned.returncode == -signal.SIGKILL, "the hung child was killed and reaped"
    finally:
        await collector.close()


@pytest.mark.slow
def test_hung_mount_never_delays_metrics_or_shutdown(tmp_path):
    plant_fifo(tmp_path)
    port = free_port()
    config = tmp_path.parent / f"{tmp_path.name}.toml"
    config.write_text(f"""
[agent]
interval = 0.5
[probes]
interval = 1.0
timeout = 3.0
[[probes.targets]]
mountpoint = "/mnt/hung"
path = "{tmp_path}"
[checkpoint]
listen = "127.0.0.1:0"
""")
    agent = start_agent_process("--simulate", "healthy", "--config", str(config), "--listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"

    # a scrape that waited for the hung probe would take its timeout (3 s); one that did not takes
    # milliseconds on an idle machine and 0.12 s was seen with the suite's three workers on two cores
    waited = 1.0

    def scrape() -> tuple[float, dict]:
        started = time.perf_counter()
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        took = time.perf_counter() - started
        out = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.labels.get("mountpoint") == "/mnt/hung":
                    out[(s.name, s.labels.get("reason"))] = s.value
        return took, out

    try:
        wait_http(url)
        time.sleep(1.5)
        took1, first = scrape()
        time.sleep(1.0)
        took2, second = scrape()
        assert took1 < waited and took2 < waited, (took1, took2)
        inflight = "stoker_nas_probe_inflight_seconds", None
        assert 0 < first[inflight] < second[inflight]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            took, now = scrape()
            assert took < waited, took
            if now.get(("stoker_nas_probe_failures_total", "timeout"), 0) >= 1:
                break
            time.sleep(0.3)
        assert now[("stoker_nas_probe_failures_total", "timeout")] >= 1
        time.sleep(0.5)  # a new probe is hanging again
        started = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=5)
        assert time.monotonic() - started < 5 and agent.returncode == 0
    finally:
        agent.kill()
