"""The exposition parsed back: names, types, labels and units as the contract says."""

from __future__ import annotations

import gzip
import time

from prometheus_client.parser import text_string_to_metric_families

from stoker.agent.gpu import gpu_collector
from stoker.agent.supervisor import Supervisor
from stoker.exporters.exposition import Exposition
from tests.contract import contract

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


async def _exposition_after(fake, cycles: int = 3) -> Exposition:
    exposition = Exposition()
    collector = gpu_collector(fake, interval=1.0, slow_interval=10.0, call_timeout=2.0)
    supervisor = Supervisor([collector], exposition, lambda: {"version": "t", "nvml_version": "n", "driver_version": "d"})
    try:
        await supervisor.run_cycle(collector)
        fake.inject_xid(1, 79)
        for _ in range(cycles):
            fake.node.clock.advance(1.0)
            await supervisor.run_cycle(collector)
            time.sleep(0.05)  # let the XID thread deliver
        await supervisor.run_cycle(collector)
    finally:
        await supervisor.stop()
    return exposition


def _families(body: bytes):
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


async def test_every_gpu_metric_of_the_contract_is_exported_with_its_type_and_labels(fake):
    body = (await _exposition_after(fake)).body()
    families = _families(body)
    expected = contract()
    seen = set()
    for name, fam in families.items():
        sample_names = {s.name for s in fam.samples}
        full = name + "_total" if fam.type == "counter" else name
        assert full in expected, f"{full} is exported but not documented in docs/METRICS.md"
        kind, labels = expected[full]
        assert fam.type == kind, f"{full}: exported as {fam.type}, documented as {kind}"
        for s in fam.samples:
            got = set(s.labels) - {"le"}
            assert got == labels, f"{s.name}: labels {sorted(got)} != documented {sorted(labels)}"
        if sample_names:
            seen.add(full)
    only_when_refused = {"stoker_gpu_permission_denied"}  # present when NVML refuses a call (test_gpu_source)
    only_on_mig = {n for n in expected if n.startswith("stoker_gpu_instance_")}  # MIG GPUs' (test_nvml_drivers)
    verdict_side = {"stoker_gpu_busy_ratio", "stoker_gpu_busy_seconds_total",
                    "stoker_gpu_job_info"}  # the verdict collector's
    gpu_contract = {n for n in expected if n.startswith("stoker_gpu_")} - verdict_side - only_when_refused - only_on_mig
    assert gpu_contract - seen == set(), "documented GPU metrics without samples in the exposition"
    for agent_metric in ("stoker_build_info", "stoker_collector_up", "stoker_collector_duration_seconds",
                         "stoker_collector_last_success_timestamp_seconds"):
        assert agent_metric in seen


async def test_units_and_ranges_are_base_units(fake):
    families = _families((await _exposition_after(fake)).body())
    for s in families["stoker_gpu_sm_active_ratio"].samples:
        assert 0.0 <= s.value <= 1.0
    for s in families["stoker_gpu_sm_clock_hertz"].samples:
        assert 1e8 < s.value < 3e9  # Hz, not MHz
    for s in families["stoker_gpu_power_watts"].samples:
        assert 50 < s.value < 800  # W, not mW
    assert len(families["stoker_gpu_up"].samples) == 8
    xid = [s for s in families["stoker_gpu_xid_errors"].samples if s.name.endswith("_total")]
    assert [(s.labels["gpu"], s.labels["xid"], s.value) for s in xid] == [("1", "79", 1.0)]


async def test_gzip_body_is_the_same_exposition(fake):
    exposition = await _exposition_after(fake, cycles=1)
    assert gzip.decompress(exposition.gzipped()) == exposition.body()


async def test_gpm_unsupported_means_absent_series_not_zero(fake):
    fake.gpm_supported = False
    families = _families((await _exposition_after(fake)).body())
    assert families.get("stoker_gpu_sm_active_ratio") is None or not families["stoker_gpu_sm_active_ratio"].samples
    assert len(families["stoker_gpu_utilization_ratio"].samples) == 8


async def test_whole_simulated_node_matches_the_contract(tmp_path):
    """Every family the full agent serves is documented, with its type and labels."""
    from tests.conftest import simulated_exposition

    families = _families(await simulated_exposition(tmp_path, "network-congested"))
    expected = contract()
    seen = set()
    for name, fam in families.items():
        full = name + "_total" if fam.type == "counter" else name
        assert full in expected, f"{full} is exported but not documented"
        assert fam.type == expected[full][0], full
        for s in fam.samples:
            assert set(s.labels) - {"le"} == expected[full][1], s.name
        if fam.samples:
            seen.add(full)
    wanted = {n for n in expected if n.startswith(("stoker_rdma_", "stoker_net_", "stoker_nfs_", "stoker_nas_"))}
    assert wanted - seen == set()
    assert len(families["stoker_rdma_port_up"].samples) == 8
    assert len(families["stoker_net_up"].samples) == 8
    series = sum(len(f.samples) for f in families.values())
    assert series < 2500, f"{series} series on a full XE9680 (contract: under 2,500)"


async def test_fast_renderer_matches_prometheus_client_byte_for_byte(tmp_path):
    from prometheus_client.core import GaugeMetricFamily

    from stoker.exporters.exposition import reference_render, render
    from tests.simdrive import SimDrive

    drive = SimDrive("checkpoint", str(tmp_path))
    drive.run(15)
    from stoker.exporters import gpu, nfs, rdma, verdicts
    for families in (gpu.families(drive.view.gpu), rdma.families(drive.view.rdma), nfs.families(drive.view.nfs),
                     verdicts.families(drive.verdicts.snapshot)):
        families = list(families)
        assert render(families) == reference_render(families)
    odd = GaugeMetricFamily("stoker_odd", 'help with \\ and \n newline', labels=["path"])
    odd.add_metric(['/mnt/a "quoted"\\dir\nx'], float("inf"))
    odd.add_metric(["plain"], float("nan"))
    assert render([odd]) == reference_render([odd])


PROCESS = {"process_cpu_seconds", "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds",
           "process_max_fds", "process_start_time_seconds"}


def test_process_families_are_prometheus_clients_and_render_byte_identical():
    """The families prometheus-client's ProcessCollector serves (prometheus/client_python,
    prometheus_client/process_collector.py): the same names, help, types and values, except the
    open descriptors, which it counts by listing /proc/self/fd and so counts the listing's own."""
    import os

    from prometheus_client import ProcessCollector

    from stoker.exporters.exposition import reference_render, render
    from stoker.exporters.process import ProcessMetrics

    metrics = ProcessMetrics()  # holds two descriptors of its own, counted while it lives
    ours, theirs = list(metrics.collect()), list(ProcessCollector(registry=None).collect())
    assert [(f.name, f.type, f.documentation) for f in ours] == [(f.name, f.type, f.documentation) for f in theirs]
    assert {f.name for f in ours} == PROCESS
    values = {f.name: (f.samples[0].value, t.samples[0].value) for f, t in zip(ours, theirs)}
    for name in ("process_start_time_seconds", "process_max_fds"):
        assert values[name][0] == values[name][1], name
    assert values["process_open_fds"][0] == len(os.listdir("/proc/self/fd")) - 1
    assert render(ours) == reference_render(ours)


def test_open_descriptors_are_listed_at_most_every_10_s_where_the_kernel_does_not_count_them(monkeypatch):
    """Before Linux 6.2 the size of /proc/self/fd is 0 (fs/proc/fd.c gained proc_fd_getattr in 6.2): the
    directory is listed instead, which costs 2 us a descriptor, so not on every render."""
    import os

    from stoker.exporters import process

    now = [0.0]
    metrics = process.ProcessMetrics(clock=lambda: now[0])
    fd_dir, metrics._fd_dir = metrics._fd_dir, None  # no size to read: the older kernel's case
    listings = []
    monkeypatch.setattr(process, "listed_fds", lambda: listings.append(now[0]) or 42)

    def open_fds() -> float:
        return next(f for f in metrics.collect() if f.name == "process_open_fds").samples[0].value

    assert open_fds() == 42
    now[0] = 9.9
    assert open_fds() == 42 and listings == [0.0]
    now[0] = 10.0
    assert open_fds() == 42 and listings == [0.0, 10.0]
    monkeypatch.undo()
    listed = process.listed_fds()
    assert listed == len(os.listdir("/proc/self/fd")) - 1
    assert os.fstat(fd_dir).st_size in (0, listed)  # 0: a kernel before 6.2


async def test_the_agent_serves_its_own_process_metrics_from_proc_self(tmp_path):
    """What every exporter serves, describing the agent's process (here: this test's), read from /proc/self
    and not from the simulated node's procfs tree that `agent.procfs_root` points at."""
    import os
    import time

    from tests.conftest import simulated_exposition

    families = _families(await simulated_exposition(tmp_path / "on", "healthy"))
    values = {name: families[name].samples[0].value for name in PROCESS}
    with open("/proc/self/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    with open("/proc/stat") as fh:
        boot = next(float(line.split()[1]) for line in fh if line.startswith("btime "))
    assert values["process_start_time_seconds"] == boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    assert 0 < values["process_cpu_seconds"] <= time.process_time() + 1
    assert 10e6 < values["process_resident_memory_bytes"] < values["process_virtual_memory_bytes"]
    assert 3 <= values["process_open_fds"] < values["process_max_fds"]

    agent = {"listen": "127.0.0.1:0", "interval": 0.2, "process_metrics": False}
    off = _families(await simulated_exposition(tmp_path / "off", "healthy", agent=agent))
    assert not PROCESS & set(off) and "stoker_build_info" in off
