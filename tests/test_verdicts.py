"""Verdicts on the simulated node: the built-in scenarios, the recorded H200 trace, restarts."""

from __future__ import annotations

import pytest

from stoker import config
from stoker.agent.verdicts import _same_job
from stoker.sim.drive import SimDrive
from stoker.sim.scenarios import WARMUP, Scenario, Step

INTERVAL = 1.0


@pytest.mark.parametrize("scenario, cause", [
    ("storage-starved", "storage"),
    ("network-congested", "network"),
    ("network-lossy", "network"),
    ("port-down", "network"),
    ("host-starved", "host"),
    ("nas-hang", "storage"),
    ("checkpoint", "checkpoint"),
    ("checkpoint-stall", "checkpoint"),
    ("checkpoint-slow", "checkpoint"),
])
def test_each_scenario_reaches_its_cause_within_two_intervals(tmp_path, scenario, cause):
    drive = SimDrive(scenario, str(tmp_path), INTERVAL)
    drive.run(WARMUP + 12)
    assert all(c is None for t, c in drive.history if t < WARMUP)
    when = drive.first(cause, after=WARMUP)
    assert when is not None, drive.history
    assert when - WARMUP <= 2 * INTERVAL, f"{scenario}: {cause} only at +{when - WARMUP:.0f} s"
    after = [c for t, c in drive.history if t >= when]
    assert set(after) == {cause}, f"the verdict flapped: {after}"


def test_checkpoint_stall_flips_stalled_and_counts_the_outcome(tmp_path):
    drive = SimDrive("checkpoint-stall", str(tmp_path), INTERVAL)
    drive.run(WARMUP + 2)
    m = drive.verdicts.checkpoints.mounts["/mnt/checkpoints"]
    assert m.active is not None and m.active.source == "detected" and not m.active.stalled
    drive.run(4 + drive.config.checkpoint.stall_after + 1)
    assert m.active.stalled, "no byte reached the NAS for stall_after seconds while data waits for it"
    assert m.written_bytes > 1e9 and m.active.unflushed > 100e6
    drive.verdicts.checkpoints.hint_end("/mnt/checkpoints", "completed")
    assert m.outcomes["stalled"] == 1 and m.outcomes["completed"] == 0


def test_checkpoint_completes_when_its_writes_end(tmp_path):
    drive = SimDrive("checkpoint", str(tmp_path), INTERVAL)
    drive.run(WARMUP + 13 + 10)
    m = drive.verdicts.checkpoints.mounts["/mnt/checkpoints"]
    assert m.active is None and m.outcomes["completed"] == 1
    assert 12 <= m.last_duration <= 15 and m.written_bytes > 10e9
    assert drive.history[-1][1] is None


def test_healthy_long_run_never_reaches_a_verdict(tmp_path):
    drive = SimDrive("healthy", str(tmp_path), INTERVAL)
    drive.run(300)
    assert drive.changes() == 0 and drive.history[-1][1] is None


def test_gpu_lost_is_not_a_starvation(tmp_path):
    drive = SimDrive("gpu-lost", str(tmp_path), INTERVAL)
    drive.run(WARMUP + 5)
    snap = drive.view.gpu
    assert [g.up for g in snap.gpus].count(False) == 1 and not snap.gpus[5].up
    assert drive.changes() == 0


# -- restarts ----------------------------------------------------------------------------------------

def test_restart_during_host_starvation_keeps_the_verdict_with_the_saved_level(tmp_path):
    """With no evidence at all, only the job's level tells a starved job from a small one: the
    level saved by the last run, for the same PIDs, brings the verdict back after a restart."""
    scenario = Scenario("host", (Step("saturated", 40.0), Step("input_starved", 600.0)), "", loop=False)
    cfg = config.load(overrides={"agent": {"state_file": str(tmp_path / "state.json")}})
    drive = SimDrive(scenario, str(tmp_path / "sim"), INTERVAL, cfg=cfg)
    drive.run(50)
    assert drive.history[-1][1] == "host"
    drive.restart()
    drive.run(10)
    assert [c for _, c in drive.history[-7:]] == ["host"] * 7

    (tmp_path / "state.json").unlink()
    drive.restart()
    drive.run(10)
    assert {c for _, c in drive.history[-7:]} == {None}, "without the saved level, a steady 20% is a small model"


def test_saved_level_is_not_used_for_another_job(tmp_path):
    scenario = Scenario("jobs", (Step("saturated", 40.0), Step("saturated", 600.0, job="other", level=0.2)), "",
                        loop=False)
    cfg = config.load(overrides={"agent": {"state_file": str(tmp_path / "state.json")}})
    drive = SimDrive(scenario, str(tmp_path / "sim"), INTERVAL, cfg=cfg)
    drive.run(39)
    drive.restart()
    drive.run(30)
    assert drive.changes() == 0 and drive.history[-1][1] is None


# -- the recorded H200 trace ---------------------------------------------------------------------

def replay(tmp_path, phase: str):
    scenario = Scenario("replay", (Step("saturated", 60.0), Step(phase, 20.0), Step("saturated", 600.0)), "")
    drive = SimDrive(scenario, str(tmp_path), INTERVAL)
    drive.run(60 + 15)  # stop inside the phase
    return drive


def test_recorded_input_starved_phase_is_starved_by_the_host(tmp_path):
    drive = replay(tmp_path, "input_starved")
    during = [c for t, c in drive.history if 62 <= t]
    assert set(during) == {"host"}


def test_recorded_saturated_phase_is_not_starved(tmp_path):
    drive = replay(tmp_path, "saturated")
    assert drive.changes() == 0


def test_recorded_pcie_bound_phase_is_starved_although_utilization_reads_15_percent(tmp_path):
    drive = replay(tmp_path, "pcie_bound")
    snap = drive.view.gpu
    util = sum(g.utilization for g in snap.gpus) / 8
    sm = sum(g.gpm["sm_active"] for g in snap.gpus) / 8
    assert util > 0.08 and sm < 0.02, (util, sm)  # the trap: NVML utilization says busy
    during = [c for t, c in drive.history if 62 <= t]
    assert set(during) == {"host"}


def test_the_saved_job_is_found_again_by_most_of_its_pids():
    ranks = frozenset(range(100, 108))
    assert _same_job(ranks, ranks)
    assert _same_job(ranks, ranks - {106}), "a GPU lost since the save takes its rank's PID"
    assert _same_job(ranks, (ranks - {103}) | {999}), "one rank restarted"
    assert not _same_job(ranks, frozenset(range(200, 208))), "a relaunch"
    assert not _same_job(ranks, frozenset({100, 201, 202, 203})), "PIDs reused by another job"
    assert not _same_job(ranks, frozenset())
