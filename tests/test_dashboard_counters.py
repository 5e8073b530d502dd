"""What the dashboards read from the agent that a 15 s scrape of 1 s gauges would miss: the busy ratio and the
job's time as counters, and a record of each recent checkpoint, however short."""

from __future__ import annotations

import pytest

from stoker.agent.verdicts import RECENT_CHECKPOINTS
from stoker.exporters.verdicts import families
from stoker.sim.drive import SimDrive
from stoker.sim.scenarios import WARMUP

MOUNT = "/mnt/checkpoints"


def samples(drive: SimDrive, name: str) -> list:
    return [s for f in families(drive.verdicts.snapshot) for s in f.samples if s.name == name]


def test_busy_seconds_integrate_the_busy_ratio_and_the_job_time_bounds_the_starved_time(tmp_path):
    drive = SimDrive("checkpoint", str(tmp_path), 1.0)
    drive.step()  # the first window has no length yet
    expected: dict[str, float] = {}
    for _ in range(int(WARMUP) + 24):
        drive.step()
        for (gpu, _), value in drive.verdicts.busy.items():
            expected[gpu] = expected.get(gpu, 0.0) + value * 1.0  # each window weighted by its length
    busy = {s.labels["gpu"]: s.value for s in samples(drive, "stoker_gpu_busy_seconds_total")}
    assert busy == pytest.approx(expected) and len(busy) == 8
    [job] = samples(drive, "stoker_job_present_seconds_total")
    starved = sum(s.value for s in samples(drive, "stoker_starved_seconds_total"))
    assert job.value == pytest.approx(WARMUP + 24, abs=1) and 10 <= starved <= job.value
    # the 13 s checkpoint idled the GPUs: busy seconds are the job's time outside it, at the job's level
    level, checkpoint = drive.verdicts.verdict.baseline, drive.verdicts.checkpoints.mounts[MOUNT].last_duration
    assert sum(busy.values()) / 8 == pytest.approx((job.value - checkpoint) * level, rel=0.02)


def test_a_detected_checkpoint_is_recorded_with_start_duration_bytes_and_outcome(tmp_path):
    drive = SimDrive("checkpoint", str(tmp_path), 1.0)
    drive.run(WARMUP + 25)
    [duration] = samples(drive, "stoker_checkpoint_recent_duration_seconds")
    [written] = samples(drive, "stoker_checkpoint_recent_written_bytes")
    assert duration.labels == written.labels
    assert duration.labels["mountpoint"] == MOUNT and duration.labels["outcome"] == "completed"
    m = drive.verdicts.checkpoints.mounts[MOUNT]
    assert duration.value == m.last_duration and 12 <= duration.value <= 15
    assert written.value == m.written_bytes > 10e9
    assert duration.labels["started"] == f"1970-01-01T00:00:{m.last_started:02.0f}Z"


def test_checkpoints_shorter_than_a_tick_are_recorded_and_only_the_last_few_kept(tmp_path):
    drive = SimDrive("healthy", str(tmp_path), 1.0)
    drive.run(3)
    tracker = drive.verdicts.checkpoints
    for i in range(RECENT_CHECKPOINTS + 2):
        tracker.hint_start(MOUNT)
        tracker.hint_end(MOUNT, "aborted" if i == RECENT_CHECKPOINTS + 1 else "completed")
        drive.step()
    recorded = samples(drive, "stoker_checkpoint_recent_duration_seconds")
    assert len(recorded) == RECENT_CHECKPOINTS, "at most a few series per mount"
    assert sorted(s.labels["started"] for s in recorded) == [s.labels["started"] for s in recorded]
    assert recorded[-1].labels["outcome"] == "aborted"
    assert sum(v for v in tracker.mounts[MOUNT].outcomes.values()) == RECENT_CHECKPOINTS + 2


def test_a_checkpoint_ended_and_another_begun_in_one_tick_keeps_its_own_start(tmp_path):
    drive = SimDrive("healthy", str(tmp_path), 1.0)
    drive.run(3)
    tracker = drive.verdicts.checkpoints
    tracker.hint_start(MOUNT)
    first = tracker.mounts[MOUNT].active.started
    drive.run(5)
    tracker.hint_end(MOUNT, "completed")
    tracker.hint_start(MOUNT)
    drive.step()
    [record] = drive.verdicts.recent[MOUNT]
    assert record[0] == first and record[3] == "completed"
    assert tracker.mounts[MOUNT].active.started != first
