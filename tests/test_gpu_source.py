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


def test_energy_counter_survives_a_reset(fake, clock):
    source = make_source(fake, clock, slow_interval=1.0)
    a = source.sample().gpus[0].energy_joules
    fake.gpus[0].energy_mj = 10.0  # driver reload: NVML's counter starts again
    b = tick(source, clock).gpus[0].energy_joules
    assert b >= a


def test_transient_error_is_reported_and_series_skipped_this_cycle(fake, clock, monkeypatch):
    source = make_source(fake, clock)
    source.sample()
    real = fake.nvmlDeviceGetTemperature

    def flaky(handle, sensor):
        raise N.NVMLError(N.NVML_ERROR_TIMEOUT)

    monkeypatch.setattr(fake, "nvmlDeviceGetTemperature", flaky)
    s = tick(source, clock)
    assert "gpu" not in s.gpus[0].temperature and s.problems.count("timeout") == 8
    monkeypatch.setattr(fake, "nvmlDeviceGetTemperature", real)
    s = tick(source, clock)
    assert "gpu" in s.gpus[0].temperature, "a transient error is retried, not remembered"


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
