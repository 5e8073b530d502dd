"""The GPU source at the pynvml boundary: the fake NVML, driven through its fault switches."""

from __future__ import annotations

import time

import pynvml as N
import pytest

from stoker.sources.gpu import GpuSource, LibraryDown


def make_source(fake, clock, slow_interval=10.0) -> GpuSource:
    return GpuSource(fake, slow_interval=slow_interval, clock=clock, wall=clock)


def tick(source, clock, seconds=1.0):
    clock.advance(seconds)
    return source.sample()


def test_eight_gpus_with_gpm_activity_after_two_ticks(fake, clock):
    source = make_source(fake, clock)
    first = source.sample()
    assert [g.index for g in first.gpus] == list(range(8))
    assert all(g.up for g in first.gpus)
    assert all("sm_active" not in g.gpm for g in first.gpus), "GPM needs a previous sample"
    second = tick(source, clock)
    for g in second.gpus:
        # `healthy` replays the recorded saturated phase: SM activity ~0.9
        assert 0.6 < g.gpm["sm_active"] <= 1.0
        assert g.gpm["tensor_active"] > 0.5
        assert g.pcie_rx_bytes > 0 and g.nvlink_tx_bytes > 0
        assert g.memory_total_bytes == 81559 * 2**20


def test_one_gpm_request_serves_every_gpu_and_tick(clock):
    """The metrics request is built once and reused: each GPU's activity is still that of its own two
    latest samples, tick after tick, through the phases of the `cycle` scenario (staggered per GPU)."""
    from stoker.sim.fake_nvml import FakeNVML
    from stoker.sim.node import SimNode
    from stoker.sources.gpu import GPM_METRICS
    fake = FakeNVML(SimNode("cycle", clock=clock))
    source = make_source(fake, clock)
    source.sample()
    distinct = set()
    for _ in range(30):
        s = tick(source, clock, 3.0)
        for g, kept in zip(s.gpus, source._gpus):
            cur, prev = kept.gpm_pair.samples
            request = N.c_nvmlGpmMetricsGet_t()  # built afresh, as before
            request.version = N.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(GPM_METRICS)
            request.sample1, request.sample2 = prev, cur
            for i, metric_id in enumerate(GPM_METRICS.values()):
                request.metrics[i].metricId = metric_id
            fake.nvmlGpmMetricsGet(request)
            expected = {name: max(0.0, min(1.0, request.metrics[i].value / 100.0))
                        for i, name in enumerate(GPM_METRICS) if name in g.gpm}
            assert g.gpm == expected and len(expected) == 4
            distinct.add(round(g.gpm["sm_active"], 3))
    assert len(distinct) > 10, "the phases moved the activity"


def test_gpm_bytes_integrate_rate_over_the_window(fake, clock):
    source = make_source(fake, clock)
    source.sample()
    a = tick(source, clock, 1.0).gpus[0].nvlink_tx_bytes
    b = tick(source, clock, 2.0).gpus[0].nvlink_tx_bytes
    # ~1200 MiB/s per tensor-percent * ~88% tensor activity: about 100 GiB/s
    rate = (b - a) / 2.0
    assert 50 * 2**30 < rate < 130 * 2**30


def test_throttle_seconds_integrate_the_clock_event_bitmask(fake, clock):
    source = make_source(fake, clock)
    source.sample()
    total = 0.0
    for _ in range(40):
        s = tick(source, clock, 0.25)
    total = s.gpus[0].throttle_seconds["sw_power_cap"]
    # the recorded saturated phase is power-capped part of the time (bit 0x4)
    assert 0 < total <= 10.0
    assert s.gpus[0].throttle_seconds["hw_thermal"] == 0.0


def test_not_supported_getter_drops_only_that_series(fake, clock):
    fake.unsupported.add("nvmlDeviceGetPowerUsage")
    source = make_source(fake, clock)
    source.sample()
    s = tick(source, clock)
    for g in s.gpus:
        assert g.up and g.power_watts is None
        assert g.sm_clock_hertz is not None and g.gpm["sm_active"] > 0
    calls = fake.calls["nvmlDeviceGetPowerUsage"]
    tick(source, clock)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == calls, "an unsupported getter is not asked again"
    assert s.problems == []


def test_unsupported_fields_follow_the_recorded_h200(fake, clock):
    s = make_source(fake, clock).sample()
    g = s.gpus[0]
    assert g.energy_joules > 0 and g.ecc_errors == {"corrected": 0, "uncorrected": 0}
    assert set(g.remapped_rows) == {"correctable", "uncorrectable", "pending", "failure"}


def test_lost_gpu_goes_down_alone_and_comes_back(fake, clock):
    source = make_source(fake, clock)
    source.sample()
    before = tick(source, clock).gpus[5].energy_joules
    fake.lost.add(3)
    s = tick(source, clock)
    assert not s.gpus[3].up and s.gpus[3].uuid == fake.gpus[3].uuid
    assert "gpu_lost" in s.problems
    others = [g for g in s.gpus if g.index != 3]
    assert all(g.up and "sm_active" in g.gpm for g in others), "healthy GPUs keep their GPM baseline"
    # backoff: still lost, still down, others unaffected
    s = tick(source, clock, 0.5)
    assert not s.gpus[3].up
    fake.lost.discard(3)
    for _ in range(5):
        s = tick(source, clock, 1.0)
    assert s.gpus[3].up and "sm_active" in s.gpus[3].gpm
    assert s.gpus[5].energy_joules >= before


def test_library_missing_at_start_then_driver_loads(fake, clock):
    fake.library_missing = True
    source = make_source(fake, clock)
    with pytest.raises(LibraryDown) as err:
        source.sample()
    assert err.value.reason == "library_not_found"
    fake.library_missing = False
    with pytest.raises(LibraryDown):  # within backoff: not retried yet
        tick(source, clock, 0.1)
    s = tick(source, clock, 2.0)
    assert len(s.gpus) == 8 and all(g.up for g in s.gpus)


def test_uninitialized_mid_run_reinitialises_with_backoff(fake, clock):
    source = make_source(fake, clock)
    source.sample()
    fake.init_count = 0  # the library forgot us (driver reload)
    with pytest.raises(LibraryDown):
        tick(source, clock)
    s = tick(source, clock, 2.0)
    assert all(g.up for g in s.gpus) and fake.init_count == 1


def test_gpm_unsupported_leaves_activity_absent_not_zero(fake, clock):
    fake.gpm_supported = False
    source = make_source(fake, clock)
    source.sample()
    s = tick(source, clock)
    g = s.gpus[0]
    assert g.gpm == {}
    assert g.utilization is not None
    # PCIe bytes fall back to the cumulative byte fields; NVLink has no such fallback
    assert g.pcie_tx_bytes is not None and g.nvlink_tx_bytes is None


def test_xid_event_is_counted_with_its_code(fake, clock):
    source = make_source(fake, clock)
    source.sample()
    fake.inject_xid(2, 79)
    fake.inject_xid(2, 79)
    fake.inject_xid(6, 48)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        s = tick(source, clock)
        if s.gpus[2].xid_counts.get(79) == 2 and s.gpus[6].xid_counts.get(48) == 1:
            break
        time.sleep(0.02)
    assert s.gpus[2].xid_counts == {79: 2}
    assert s.gpus[6].xid_counts == {48: 1}
    assert s.gpus[0].xid_counts == {}
    assert s.gpus[2].xid_last_seen[79] > 0
    source.close()


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_xid_is_counted_once_while_a_replaced_event_thread_still_waits(fake, clock):
    """A re-acquired GPU restarts the XID thread; the old one, stopped, still waits in the driver
    (up to its timeout) on an event set that also gets the event, and must not count it again."""
    source = make_source(fake, clock)
    source.sample()
    assert wait_for(lambda: sum(3 in watched for watched in fake._registered.values()) == 1)
    fake.lost.add(1)
    tick(source, clock)
    fake.lost.discard(1)
    tick(source, clock)  # GPU 1 is back: a new thread watches every GPU
    assert wait_for(lambda: sum(3 in watched for watched in fake._registered.values()) == 2)
    fake.inject_xid(3, 48)
    assert wait_for(lambda: all(q.empty() for q in fake._events.values())), "both threads took the event"
    assert wait_for(lambda: tick(source, clock).gpus[3].xid_counts == {48: 1})
    time.sleep(0.05)
    assert tick(source, clock).gpus[3].xid_counts == {48: 1}
    source.close()


def test_energy_counter_survives_a_reset(fake, clock):
    source = make_source(fake, clock, slow_interval=1.0)
    a = source.sample().gpus[0].energy_joules
    fake.gpus[0].energy_mj = 10.0  # driver reload: NVML's counter starts again
    b = tick(source, clock).gpus[0].energy_joules
    assert b >= a


def test_transient_error_is_reported_and_series_skipped_this_cycle(fake, clock, monkeypatch):
    source = make_source(fake, clock)
    source.sample()
    real = fake.nvmlDeviceGetPowerUsage

    def flaky(handle):
        raise N.NVMLError(N.NVML_ERROR_TIMEOUT)

    monkeypatch.setattr(fake, "nvmlDeviceGetPowerUsage", flaky)
    s = tick(source, clock)
    assert s.gpus[0].power_watts is None and s.problems.count("timeout") == 8
    monkeypatch.setattr(fake, "nvmlDeviceGetPowerUsage", real)
    s = tick(source, clock)
    assert s.gpus[0].power_watts is not None, "a transient error is retried, not remembered"


def test_temperatures_and_sm_clock_are_read_on_the_slow_tier_and_held_between(fake, clock):
    """Only exported: read with energy and ECC every `slow_interval`, carried by every sample."""
    source = make_source(fake, clock, slow_interval=10.0)
    first = source.sample().gpus[0]
    assert first.temperature.keys() == {"gpu", "memory"} and first.sm_clock_hertz and first.slow_at is not None
    calls = (fake.calls.get("nvmlDeviceGetTemperature"), fake.calls.get("nvmlDeviceGetClockInfo"))
    for _ in range(9):
        held = tick(source, clock).gpus[0]
        assert (held.temperature, held.sm_clock_hertz, held.slow_at) == \
               (first.temperature, first.sm_clock_hertz, first.slow_at)
    assert (fake.calls.get("nvmlDeviceGetTemperature"), fake.calls.get("nvmlDeviceGetClockInfo")) == calls
    later = tick(source, clock).gpus[0]
    assert later.slow_at > first.slow_at and fake.calls["nvmlDeviceGetTemperature"] == calls[0] + 8


def test_gpm_samples_are_freed_when_a_gpu_is_reacquired(fake, clock):
    source = make_source(fake, clock)
    source.sample()
    tick(source, clock)
    fake.lost.add(1)
    tick(source, clock)
    fake.lost.discard(1)
    for _ in range(4):
        tick(source, clock, 1.0)
    # two live samples per GPU, never more: the lost GPU's old pair went back to the driver
    assert len(fake._samples) <= 2 * len(fake.gpus)


# -- the unprivileged service: profiling restricted to administrators --------------------------------

def test_gpm_refused_falls_back_to_utilization_once_and_quietly(fake, clock):
    from structlog.testing import capture_logs
    fake.gpm_permission = False
    source = make_source(fake, clock)
    with capture_logs() as lines:
        snaps = [tick(source, clock) for _ in range(5)]
    last = snaps[-1]
    assert all(g.activity_source == "utilization" and g.refused == ("gpm",) and not g.gpm for g in last.gpus)
    assert all(g.utilization > 0.5 and g.pcie_rx_bytes > 0 for g in last.gpus), "PCIe bytes from the counters"
    assert all("no_permission" not in s.problems for s in snaps), "a policy, not an error each cycle"
    assert fake.calls["nvmlGpmSampleGet"] == 8, "refused once per GPU, then left alone"
    refusals = [x for x in lines if x["event"].startswith("NVML refuses this call")]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "warning"


def test_gpm_granted_after_a_driver_reload_comes_back_without_a_restart(fake, clock):
    from stoker.sources.gpu import REPROBE_AFTER
    fake.gpm_permission = False
    source = make_source(fake, clock)
    for _ in range(3):
        tick(source, clock)
    before = tick(source, clock).gpus[0].pcie_rx_bytes
    fake.gpm_permission = True  # NVreg_RestrictProfilingToAdminUsers=0 and a driver reload
    tick(source, clock, REPROBE_AFTER)
    back = tick(source, clock)
    assert all(g.activity_source == "gpm" and 0.6 < g.gpm["sm_active"] <= 1.0 and not g.refused for g in back.gpus)
    assert back.gpus[0].pcie_rx_bytes >= before, "the PCIe counter goes on from where the fallback left it"
