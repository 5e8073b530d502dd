"""Goodput accounting (detect/goodput.py): the arithmetic on every simulated scenario, and the rules
(states, restarts and lost work, checkpoints, steps, declared jobs, cardinality) on hand-made ticks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stoker.config import DetectConfig
from stoker.detect.checkpoint import HintError
from stoker.detect.goodput import (FORGET_AFTER, MAX_JOBS, NEW_RUN_EVERY, NODE_STATES, STATES, GoodputLedger,
                                   StepRecord)
from stoker.sim import jobs as sim_jobs
from stoker.sim import scenarios
from stoker.sim.drive import SimDrive
from stoker.sources.gpu import GpuSample, GpuSnapshot
from stoker.sources.jobs import JobSnapshot, Owner
from stoker.sim.judge import run_length
from tests.simdrive import play_judged

TESTS = Path(__file__).parent
JOB_SCENARIOS = sorted((TESTS / "scenarios" / "jobs").glob("*.toml"))
EVERY = [str(p) for p in sorted((TESTS / "scenarios").glob("*.toml"))] + scenarios.builtin_names() + [
    str(p) for p in JOB_SCENARIOS]
EPS = 1e-6


# -- every simulated scenario: the parts add up to wall time ------------------------------------

@dataclass
class Tick:
    ledger: GoodputLedger
    dt: float
    job: str | None  # the id the agent should attribute the scenario's job to; None: none holds the GPUs
    scheduled: bool  # the job's processes sit in a scheduler's cgroup
    busy_known: bool
    cause: str | None


class Recorder(SimDrive):
    """The drive, noting at each tick what the accounting should have seen."""

    def __init__(self, *args, **kwargs):
        self.ticks: list[Tick] = []
        self._last: dict[int, tuple[float, dict]] = {}  # ledger -> (its last tick, its totals then)
        super().__init__(*args, **kwargs)

    def step(self):
        verdict = super().step()
        ledger, t = self.verdicts.goodput, self.view.t
        last_t, before = self._last.get(id(ledger), (t, {}))
        totals = {("node", s): v for s, v in ledger.node.items()}
        totals.update(((j, s), v) for j, a in ledger.jobs.items() for s, v in a.seconds.items())
        assert all(totals.get(k, v) >= v - EPS for k, v in before.items()), "a counter went back"
        self._last[id(ledger)] = (t, totals)
        step = self.sim.node.step()
        held = any(g.up and (g.processes or 0) > 0 for g in self.view.gpu.gpus)
        self.ticks.append(Tick(ledger, t - last_t, sim_jobs.job_id(step.job, step.scheduler) if held else None,
                               step.scheduler != "none", bool(self.verdicts.busy), verdict.cause))
        return verdict


@pytest.mark.parametrize("name", EVERY, ids=lambda n: Path(n).stem)
def test_the_parts_add_up_to_wall_time(tmp_path, name):
    scenario = scenarios.get(name)
    drive = Recorder(scenario, str(tmp_path))
    try:
        drive.run(run_length(scenario))
    finally:
        drive.close()
    for ledger in {id(t.ledger): t.ledger for t in drive.ticks}.values():
        ticks = [t for t in drive.ticks if t.ledger is ledger]
        wall = sum(t.dt for t in ticks)
        assert set(ledger.node) == set(NODE_STATES)
        assert sum(ledger.node.values()) == pytest.approx(wall, abs=EPS), ledger.node
        on_jobs = sum(v for s, v in ledger.node.items() if s not in ("no_job", "unknown"))
        assert sum(sum(a.seconds.values()) for a in ledger.jobs.values()) == pytest.approx(on_jobs, abs=EPS)
        assert ledger.node["no_job"] == pytest.approx(sum(t.dt for t in ticks if t.job is None), abs=EPS)
        for a in ledger.jobs.values():
            assert set(a.seconds) == set(STATES)
            assert a.seconds["productive"] == pytest.approx(a.productive, abs=EPS)
            assert 0 <= a.unsaved <= a.productive + EPS and a.lost_seconds <= a.productive + EPS
        for job in {t.job for t in ticks if t.job is not None and t.scheduled}:
            mine = [t for t in ticks if t.job == job and t.busy_known]
            a = ledger.jobs[job]
            assert sum(a.seconds.values()) == pytest.approx(sum(t.dt for t in mine), abs=EPS), job
            for cause in ("storage", "network", "host", "checkpoint"):
                assert a.seconds[cause] == pytest.approx(sum(t.dt for t in mine if t.cause == cause), abs=EPS)


# -- the job scenarios: what each one must show ----------------------------------------------------

def play(name: str, tmp_path) -> tuple[SimDrive, GoodputLedger]:
    drive = play_judged(scenarios.get(str(TESTS / "scenarios" / "jobs" / f"{name}.toml")), tmp_path)
    return drive, drive.verdicts.goodput


def test_a_restart_loses_the_work_since_the_checkpoint_started(tmp_path):
    drive, ledger = play("restart-after-checkpoint", tmp_path)
    job = ledger.jobs[sim_jobs.slurm_job_id("llama70b")]
    assert job.restarts == 1
    # the checkpoint began at 30 s (detected at once: 31 s); 40 s of training followed it, 3 s of which
    # went to the checkpoint's last writes: what the restart lost is that training
    assert 34 <= job.lost_seconds <= 38
    trained = drive.sim.jobs.steps("llama70b")
    assert job.lost_steps == 16 and job.last_step == trained
    assert job.steps == trained + job.lost_steps  # every step reported once, the redone ones again
    assert job.tokens == job.steps * 4194304
    assert 55 <= job.unsaved <= 61  # no checkpoint since the restart
    assert {b.source for bindings in ledger.gpus.values() for b in bindings} == {"cgroup"}


def test_a_pod_restart_before_any_checkpoint_loses_everything(tmp_path):
    _, ledger = play("pod-restart-without-checkpoint", tmp_path)
    (job,) = ledger.jobs.values()
    assert job.job_id == sim_jobs.pod_uid("finetune") and job.scheduler == "kubernetes"
    assert job.restarts == 1 and job.lost_seconds == pytest.approx(job.seconds["productive"] - job.unsaved)
    assert job.lost_seconds >= 45 and job.lost_steps >= 45


def test_storage_starvation_is_lost_time_and_slower_steps(tmp_path):
    _, ledger = play("starved-by-storage", tmp_path)
    (job,) = ledger.jobs.values()
    assert 40 <= job.seconds["storage"] <= 45 and job.seconds["productive"] >= 50
    buckets = dict(job.step_seconds.buckets())
    assert buckets["4.0"] < buckets["+Inf"]  # starved steps took 5x as long as the 2 s ones


def test_jobs_in_turn_are_two_accounts_with_their_own_causes(tmp_path):
    _, ledger = play("jobs-in-turn", tmp_path)
    pretrain, sft = (ledger.jobs[sim_jobs.slurm_job_id(n)] for n in ("pretrain", "sft"))
    assert not pretrain.present and sft.present
    assert pretrain.seconds["host"] == 0 and 29 <= sft.seconds["host"] <= 31
    assert pretrain.restarts == sft.restarts == 0
    assert ledger.node["no_job"] == pytest.approx(6, abs=1)


def test_a_job_without_a_scheduler_is_known_by_its_hints_only(tmp_path):
    _, ledger = play("self-declared-job", tmp_path)
    declared = ledger.jobs["notebook-run"]
    assert declared.steps >= 18 and declared.seconds["productive"] >= 36
    # the job that came next never said who it is: it is not the one that stopped hinting
    assert declared.restarts == 0
    assert {b.job_id for bindings in ledger.gpus.values() for b in bindings} == {"unknown"}


# -- the rules, tick by tick -------------------------------------------------------------------------

def snapshot(pids: dict[int, list[int]], memory: float = 50e9, up: set[int] | None = None) -> GpuSnapshot:
    return GpuSnapshot([GpuSample(i, f"GPU-{i}", up=up is None or i in up, processes=len(pids.get(i, [])),
                                  pids=tuple(pids.get(i, [])), memory_used_bytes=memory if i in pids else 1e9)
                        for i in range(8)])


def slurm(job: str) -> Owner:
    return Owner(job, "slurm", "cgroup")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@dataclass
class Mount:
    last_started: float | None = None
    outcomes: dict = field(default_factory=lambda: {"completed": 0})
    active: object | None = None


class Checkpoints:
    def __init__(self):
        self.mounts = {"/mnt/ckpt": Mount()}

    def start(self, t):
        m = self.mounts["/mnt/ckpt"]
        m.last_started, m.active = t, object()

    def complete(self):
        m = self.mounts["/mnt/ckpt"]
        m.outcomes["completed"] += 1
        m.active = None


def busy(value: float, gpus=range(8)) -> dict:
    return {(str(i), f"GPU-{i}"): value for i in gpus}


def run(ledger, clock, seconds, gpu, owners, cause=None, level=0.9, ckpt=None):
    for _ in range(seconds):
        clock.now += 1
        ledger.tick(clock.now, gpu, JobSnapshot(owners), cause, busy(level), ckpt)


def test_states_by_verdict_and_activity():
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    gpu = snapshot({i: [100 + i] for i in range(8)})
    owners = {100 + i: slurm("42") for i in range(8)}
    ledger.tick(clock.now, gpu, JobSnapshot(owners), None, busy(0.9))  # the first tick has no duration
    run(ledger, clock, 10, gpu, owners)
    run(ledger, clock, 4, gpu, owners, cause="storage", level=0.1)
    run(ledger, clock, 3, gpu, owners, level=0.01)  # idle, no verdict (the level is not known yet, say)
    run(ledger, clock, 2, snapshot({}), {})
    run(ledger, clock, 1, None, {})  # NVML did not answer
    job = ledger.jobs["42"]
    assert job.seconds == {"productive": 10, "idle": 3, "storage": 4, "network": 0, "host": 0, "checkpoint": 0,
                           "peer": 0}
    assert ledger.node == {"productive": 10, "idle": 3, "storage": 4, "network": 0, "host": 0, "checkpoint": 0,
                           "peer": 0, "no_job": 2, "unknown": 1}
    assert not job.present and ledger.gpus == {}


def test_lost_work_is_the_productive_time_since_the_completed_checkpoint_began():
    clock, ckpt = Clock(), Checkpoints()
    ledger = GoodputLedger(DetectConfig(), clock)
    first = snapshot({i: [100 + i] for i in range(8)})
    owners = {p: slurm("42") for p in range(100, 108)} | {p: slurm("42") for p in range(200, 208)}
    run(ledger, clock, 20, first, owners, ckpt=ckpt)
    ckpt.start(clock.now)
    run(ledger, clock, 5, first, owners, cause="checkpoint", level=0.0, ckpt=ckpt)
    ckpt.complete()
    run(ledger, clock, 30, first, owners, ckpt=ckpt)
    assert ledger.jobs["42"].unsaved == 30
    ckpt.start(clock.now)
    run(ledger, clock, 3, first, owners, ckpt=ckpt)  # an asynchronous checkpoint: the GPUs keep working
    run(ledger, clock, 1, snapshot({0: [100, 200]} | {i: [200 + i] for i in range(1, 8)}), owners, ckpt=ckpt)
    assert ledger.jobs["42"].restarts == 0  # one rank replaced at a time is the same run
    run(ledger, clock, 2, snapshot({}), owners, ckpt=ckpt)  # the job crashed before the checkpoint completed
    run(ledger, clock, 10, snapshot({i: [300 + i] for i in range(8)}), owners | {300 + i: slurm("42") for i in range(8)},
        ckpt=ckpt)
    job = ledger.jobs["42"]
    assert job.restarts == 1 and job.lost_seconds == 34  # 30 s after the first checkpoint, 4 during the second
    assert job.unsaved == 10


def test_steps_are_counted_once_per_run_and_a_resumed_run_counts_the_steps_done_again():
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    first = snapshot({i: [100 + i] for i in range(8)})
    run(ledger, clock, 2, first, {100 + i: slurm("42") for i in range(8)})
    job_id, accepted, dup = ledger.record_steps([StepRecord(n, 2.0, 1000, 8) for n in range(1, 11)], job="42",
                                                run="a", pid=100)
    assert (job_id, accepted, dup) == ("42", 10, 0)
    assert ledger.record_steps([StepRecord(n, 2.0) for n in range(8, 13)], run="a", pid=100)[1:] == (2, 3)
    clock.now += NEW_RUN_EVERY  # the job crashes and is relaunched: new processes, which resume at step 6
    run(ledger, clock, 1, snapshot({i: [200 + i] for i in range(8)}), {200 + i: slurm("42") for i in range(8)})
    assert ledger.record_steps([StepRecord(6, 2.0), StepRecord(7, 2.0)], run="b", pid=200)[1:] == (2, 0)
    assert ledger.record_steps([StepRecord(13)], run="a", pid=100)[1:] == (0, 1)  # its processes are gone: stale
    job = ledger.jobs["42"]
    assert (job.steps, job.lost_steps, job.last_step, job.tokens, job.samples) == (14, 7, 7, 10_000, 80)
    assert job.restarts == 1  # counted once, by the processes
    assert dict(job.step_seconds.buckets())["2.0"] == 14 and job.step_seconds.total == 28.0


def test_a_hint_that_names_a_job_counts_for_it_or_is_refused_never_merged():
    """Issue 26: with Slurm job 3247075 on the GPUs, steps named 4242 or adapter-job were counted for
    3247075, whose last step fell from 1039 to 1 and whose lost steps rose by 1074."""
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    gpu, owners = snapshot({i: [100 + i] for i in range(8)}), {100 + i: slurm("3247075") for i in range(8)}
    run(ledger, clock, 2, gpu, owners)
    for n in range(1, 1040, 100):
        clock.now += 100
        ledger.record_steps([StepRecord(k) for k in range(n, min(n + 100, 1040))], job="3247075",
                            run="slurm:3247075.0.0", pid=100)
    assert ledger.record_steps([StepRecord(1)], job="4242")[0] == "4242"  # sent by hand, no pid
    assert ledger.record_steps([StepRecord(1)], job="adapter-job", run="pid:999.1", pid=999)[0] == "adapter-job"
    with pytest.raises(HintError) as err:  # rank 0 of 3247075, naming itself otherwise
        ledger.record_steps([StepRecord(1040)], job="llama-run7", run="slurm:3247075.0.0", pid=100)
    assert err.value.status == 409 and "pid 100 is a process of job 3247075" in str(err.value)
    assert "STOKER_JOB_ID" in str(err.value)
    job = ledger.jobs["3247075"]
    assert (job.steps, job.last_step, job.lost_steps, job.restarts) == (1039, 1039, 0, 0)
    assert (ledger.jobs["4242"].steps, ledger.jobs["adapter-job"].steps) == (1, 1)
    assert "llama-run7" not in ledger.jobs
    assert ledger.record_steps([StepRecord(1040)], run="slurm:3247075.0.0", pid=100)[0] == "3247075"  # its process's
    assert ledger.record_steps([StepRecord(1041)], run="slurm:3247075.0.0", pid=999)[0] == "3247075"  # the only job
    empty = GoodputLedger(DetectConfig(), Clock())
    with pytest.raises(HintError) as err:
        empty.record_steps([StepRecord(1)])
    assert err.value.status == 400
    unplaced = GoodputLedger(DetectConfig(), clock)
    run(unplaced, clock, 1, gpu, {})  # GPUs held by processes nobody can place: not a job to count steps for
    with pytest.raises(HintError):
        unplaced.record_steps([StepRecord(1)], pid=999)
    assert empty.record_steps([StepRecord(1)], job="declared")[0] == "declared"


def test_slurms_two_names_of_one_job_are_not_a_contradiction():
    """Slurm 26.05 names a job's cgroup by its SLUID (slurm src/plugins/cgroup/v2/cgroup_v2.c,
    `cgroup_p_step_create`; src/common/sluid.h) while SLURM_JOB_ID, which the helper sends, is its
    number: rank 0's steps count for the SLUID. Two numbers, or a name of the job's own, still conflict."""
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    sluid = "sEKNKTV3WPV500"
    run(ledger, clock, 2, snapshot({i: [100 + i] for i in range(8)}), {100 + i: slurm(sluid) for i in range(8)})
    assert ledger.record_steps([StepRecord(1)], job="4343", scheduler="slurm", run="r", pid=100)[0] == sluid
    for job, scheduler in (("4343", None), ("llama-run7", "slurm")):
        with pytest.raises(HintError) as err:
            ledger.record_steps([StepRecord(2)], job=job, scheduler=scheduler, run="r", pid=100)
        assert err.value.status == 409
    numbered = GoodputLedger(DetectConfig(), clock)  # CgroupJobIdPaths=yes: the number names the cgroup
    run(numbered, clock, 1, snapshot({0: [100]}), {100: slurm("4343")})
    with pytest.raises(HintError):  # two numbers: two jobs
        numbered.record_steps([StepRecord(1)], job="4344", scheduler="slurm", pid=100, run="r")
    assert set(ledger.jobs) == {sluid} and set(numbered.jobs) == {"4343"}


def test_a_token_holder_cannot_corrupt_a_job_whose_processes_the_agent_sees():
    """Issue 25: naming another job's PID with a new run made that job's own steps stale for good, and a
    step number of 2**63 - 1 took lost_steps to 1.8e19."""
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    gpu, owners = snapshot({i: [100 + i] for i in range(8)}), {100 + i: slurm("42") for i in range(8)}
    run(ledger, clock, 2, gpu, owners)
    ledger.record_steps([StepRecord(n, 1.0) for n in range(1, 101)], run="slurm:42.0.0", pid=100)
    for evil in (dict(run="evil", pid=100), dict(run="evil", pid=101, job="42"), dict(run="evil")):
        with pytest.raises(HintError) as err:
            ledger.record_steps([StepRecord(0)], **evil)
        assert err.value.status == 409 and "new processes" in str(err.value)
    with pytest.raises(HintError) as err:  # the job's own run, far ahead: not made its last step
        ledger.record_steps([StepRecord(2**53)], run="slurm:42.0.0", pid=100)
    assert err.value.status == 400 and "steps a second" in str(err.value)
    run(ledger, clock, 2, gpu, owners)
    assert ledger.record_steps([StepRecord(101), StepRecord(102)], run="slurm:42.0.0", pid=100)[1:] == (2, 0)
    job = ledger.jobs["42"]
    assert (job.steps, job.last_step, job.lost_steps, job.restarts, job.run) == (102, 102, 0, 0, "slurm:42.0.0")
    # a relaunch: new processes, and a forged run claims them first; it cannot hold the job for good
    relaunched = snapshot({i: [200 + i] for i in range(8)})
    clock.now += NEW_RUN_EVERY
    run(ledger, clock, 1, relaunched, {200 + i: slurm("42") for i in range(8)})
    assert ledger.record_steps([StepRecord(10**6)], run="forged", pid=200)[1:] == (1, 0)
    with pytest.raises(HintError):
        ledger.record_steps([StepRecord(51)], run="slurm:42.0.1", pid=200)
    clock.now += NEW_RUN_EVERY  # the forged run says no more: the job's own goes on
    assert ledger.record_steps([StepRecord(51), StepRecord(52)], run="slurm:42.0.1", pid=200)[1:] == (2, 0)
    # lost: steps 51-102 of the run the relaunch replaced, not a million of the forged one
    assert (job.last_step, job.run, job.restarts, job.lost_steps) == (52, "slurm:42.0.1", 1, 52)


def test_new_runs_of_a_job_nobody_can_see_are_rate_limited_and_bounded():
    """A job in another PID namespace: its runs are its restarts, and anyone with the token can start
    one. 10,000 new runs gave restarts_total 10,000; each one's steps now count at most what the job
    reported, new runs come at most every NEW_RUN_EVERY, and the job's own run counts on."""
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    invisible = snapshot({i: [] for i in range(8)})
    run(ledger, clock, 1, invisible, {})
    step = 0
    refused = 0
    for n in range(10_000):
        if n % 100 == 0:  # the job goes on, a step a second
            clock.now += 1
            step += 1
            assert ledger.record_steps([StepRecord(step)], job="pod-a", run="torchelastic:a.0")[1] == 1
        try:
            ledger.record_steps([StepRecord(0), StepRecord(2**53)], job="pod-a", run=f"evil-{n}")
        except HintError as exc:
            assert exc.status == 429 and "at most one every" in str(exc)
            refused += 1
    job = ledger.jobs["pod-a"]
    elapsed = clock.now - 100
    assert 1 <= job.restarts <= elapsed / NEW_RUN_EVERY + 1 and refused >= 10_000 - job.restarts - 1
    assert job.lost_steps <= job.steps
    assert job.run == "torchelastic:a.0" and job.last_step == step == 100  # the job's own run still counts
    assert ledger.record_steps([StepRecord(step + 1)], job="pod-a", run="torchelastic:a.0")[1:] == (1, 0)


def test_a_declared_job_claims_gpus_nobody_owns_but_not_the_processes_after_it():
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    invisible = snapshot({i: [] for i in range(8)})  # another PID namespace: memory held, no PIDs
    run(ledger, clock, 2, invisible, {})
    assert {b.job_id for b in ledger.gpus[("0", "GPU-0")]} == {"unknown"}
    ledger.record_steps([StepRecord(1)], job="pod-a", gpus=["GPU-0", "GPU-1"])
    ledger.record_steps([StepRecord(1)], job="pod-b", gpus=["GPU-2"])
    run(ledger, clock, 1, invisible, {})
    assert [ledger.gpus[(str(i), f"GPU-{i}")][0].job_id for i in range(4)] == ["pod-a", "pod-a", "pod-b", "unknown"]
    assert ledger.gpus[("0", "GPU-0")][0].source == "hint"
    visible = snapshot({i: [500 + i] for i in range(8)})
    lone = GoodputLedger(DetectConfig(), clock)
    run(lone, clock, 1, visible, {})  # the processes start; then they say who they are
    lone.record_steps([StepRecord(1)], job="notebook")
    run(lone, clock, 3, visible, {})
    assert {b.job_id for bs in lone.gpus.values() for b in bs} == {"notebook"}
    clock.now += 120  # the job writes a checkpoint for two minutes, without steps: its GPUs are still its
    run(lone, clock, 1, visible, {})
    assert {b.job_id for bs in lone.gpus.values() for b in bs} == {"notebook"}
    clock.now += 10  # the job ends; other processes take the GPUs
    run(lone, clock, 3, snapshot({i: [600 + i] for i in range(8)}), {})
    assert {b.job_id for bs in lone.gpus.values() for b in bs} == {"unknown"}
    assert lone.jobs["notebook"].restarts == 0


def test_cardinality_is_bounded_and_ended_jobs_are_forgotten():
    clock = Clock()
    ledger = GoodputLedger(DetectConfig(), clock)
    for n in range(MAX_JOBS):
        ledger.record_steps([StepRecord(1)], job=f"j{n}")
    with pytest.raises(HintError) as err:
        ledger.record_steps([StepRecord(1)], job="one-too-many")
    assert err.value.status == 429
    gpu = snapshot({i: [100 + i] for i in range(8)})
    run(ledger, clock, 1, gpu, {100 + i: slurm("on-the-gpus") for i in range(8)})
    assert "on-the-gpus" in ledger.jobs and len(ledger.jobs) == MAX_JOBS  # a job on a GPU takes a place
    run(ledger, clock, 2, snapshot({}), {})
    clock.now += FORGET_AFTER
    run(ledger, clock, 1, snapshot({}), {})
    assert ledger.jobs == {}
