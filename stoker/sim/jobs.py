"""The simulated node's jobs as the kernel and the job show them: processes, cgroups, steps.

Every process a scenario's jobs run (8 ranks per launch, NVML's PIDs) gets a
`/proc/<pid>/` in the simulated procfs with the cgroup its scheduler puts it
in (Slurm's cgroup v2 layout, Kubernetes' systemd driver, or a login session
for `none`) and its environment, written once at the start: the agent looks
up only the PIDs NVML reports, so a process that has ended may keep its entry.

A job with a `step_rate` trains: it completes steps at that rate while its
GPUs work at the job's level, slower when they are starved (at the speed the
recording's SM activity gives, relative to its saturated phase), none while
they wait for a checkpoint or idle. It reports them as `stoker.hints.step`
would (batches of step, duration, tokens, and the time each waited for its
batch: the input-bound slowness of an input-starved phase). A checkpoint phase saves the step
it starts at once the phase ends; a new `launch` of the job resumes from the
last saved step, so a restart redoes the steps since that checkpoint.
"""

from __future__ import annotations

import os
import threading
import uuid
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stoker.detect.checkpoint import HintError
from stoker.detect.goodput import StepRecord
from stoker.sim.node import SimNode, Ticker, data_wait, job_pid, saturated_sm

if TYPE_CHECKING:
    from stoker.detect.goodput import GoodputLedger

SIM_UUID_NAMESPACE = uuid.UUID("8f6d7c2e-5a0c-4e12-9d1b-4c399e8fb0a4")


def slurm_job_id(job: str) -> str:
    """The Slurm job id of a scenario's job name (Slurm's ids are numbers): a name that is a number
    is that id (`job = "4242"`), any other gives one of its own."""
    if job.isascii() and job.isdigit():
        return job
    return str(1_000_000 + zlib.crc32(job.encode()) % 9_000_000)


def pod_uid(job: str) -> str:
    return str(uuid.uuid5(SIM_UUID_NAMESPACE, job))


def job_id(job: str, scheduler: str) -> str:
    """The id the agent should attribute a job to (its key on the node: `SimNode.job_key`): the
    scheduler's; with no scheduler, the name the job gives itself in its step hints (without hints the
    agent cannot know it)."""
    return {"slurm": slurm_job_id, "kubernetes": pod_uid}.get(scheduler, lambda j: j)(job)


def cgroup_line(job: str, scheduler: str, gpu: int) -> str:
    if scheduler == "slurm":
        return f"0::/system.slice/slurmstepd.scope/job_{slurm_job_id(job)}/step_0/user/task_{gpu}\n"
    if scheduler == "kubernetes":
        container = f"{zlib.crc32(f'{job}/{gpu}'.encode()):08x}" * 8
        return (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                f"{pod_uid(job).replace('-', '_')}.slice/cri-containerd-{container}.scope\n")
    return "0::/user.slice/user-1000.slice/session-3.scope\n"


@dataclass
class _Training:
    """One scenario job's progress through its steps."""

    launch: int = 0
    step: int = 0  # the last completed step
    progress: float = 0.0  # of the next step
    last_done: float | None = None  # scenario seconds: when the last step completed in this launch
    saved: int = 0  # the step the last completed checkpoint holds
    checkpoint_step: int | None = None  # in a checkpoint phase: the step it saves
    batch: list[StepRecord] = field(default_factory=list)


class SimJobs:
    def __init__(self, node: SimNode, procfs_root: str):
        self.node = node
        self.procfs_root = procfs_root
        self._ticker = Ticker(node)
        self._training: dict[str, _Training] = {}
        self._hints: list[tuple[str, dict]] = []  # (scenario job, keyword arguments of record_steps)
        self._lock = threading.Lock()

    def build(self) -> None:
        """A /proc/<pid> for every rank of every launch of every job the scenario runs."""
        seen = set()
        for step in self.node.scenario.steps:
            if not step.has_job or (step.job, step.launch, step.scheduler) in seen:
                continue
            seen.add((step.job, step.launch, step.scheduler))
            key = self.node.job_key(step.job)
            for gpu in range(self.node.gpu_count):
                directory = os.path.join(self.procfs_root, str(job_pid(step.job, gpu, step.launch)))
                os.makedirs(directory, exist_ok=True)
                with open(os.path.join(directory, "cgroup"), "w") as fh:
                    fh.write(cgroup_line(key, step.scheduler, gpu))
                env = {"HOME": "/home/trainer", "LOCAL_RANK": str(gpu)}
                if step.scheduler == "slurm":
                    env.update(SLURM_JOB_ID=slurm_job_id(key), SLURM_LOCALID=str(gpu))
                with open(os.path.join(directory, "environ"), "wb") as fh:
                    fh.write(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))

    def advance(self) -> None:
        with self._lock:
            t, dt = self._ticker.tick()
            if dt <= 0:
                return
            step, _ = self.node.scenario.at(t)
            if not step.has_job or step.step_rate <= 0:
                return
            job = self._training.setdefault(step.job, _Training(launch=step.launch))
            if step.launch != job.launch:  # relaunched: the new processes resume from the last checkpoint
                job.launch, job.step, job.progress, job.last_done = step.launch, job.saved, 0.0, None
                job.checkpoint_step = None
            if step.gpu_phase == "checkpoint":
                if job.checkpoint_step is None:
                    job.checkpoint_step = job.step
            elif job.checkpoint_step is not None:
                job.saved, job.checkpoint_step = job.checkpoint_step, None
            rate = step.step_rate * self._speed(step, t)
            start = t - dt
            wait = data_wait(step)
            while rate > 0 and job.progress + rate * (t - start) >= 1.0:
                done = start + (1.0 - job.progress) / rate
                job.step += 1
                seconds = None if job.last_done is None else done - job.last_done
                job.batch.append(StepRecord(job.step, seconds, step.tokens_per_step or None,
                                            data_wait=None if seconds is None else wait * seconds))
                job.last_done, job.progress, start = done, 0.0, done
            job.progress += rate * (t - start)
            if job.batch:
                self._hints.append((step.job, self._hint(step, job)))
                job.batch = []

    def _speed(self, step, t: float) -> float:
        """How fast the job trains against its full speed: the SM activity of a GPU still on the bus; in a
        cluster, the job's speed where it spans nodes (the slowest node's: every step ends in a barrier)."""
        if step.gpu_phase in ("checkpoint", "idle") or step.level <= 0:
            return 0.0
        coupled = self.node.coupling.speed(self.node.index, t) if self.node.coupling is not None else None
        if coupled is not None:
            return coupled
        gpu = next((i for i in range(self.node.gpu_count) if i not in step.lost_gpus), None)
        if gpu is None:
            return 0.0
        return max(0.0, min(1.5, self.node.gpu_row(gpu, t)["gpm_sm_util"] / (saturated_sm() * step.level)))

    def _hint(self, step, job: _Training) -> dict:
        """What `stoker.hints.Steps` would send from local rank 0: Slurm's job id where the job runs
        under Slurm, else its own name where it has no scheduler, else nothing (the agent finds it)."""
        key = self.node.job_key(step.job)
        nodes = self.node.coupling.nodes(self.node.index, self.node.elapsed()) if self.node.coupling else None
        return {"steps": list(job.batch), "job": {"slurm": slurm_job_id(key), "none": key}.get(
                    step.scheduler), "run": f"{step.job}#{step.launch}", "pid": job_pid(step.job, 0, step.launch),
                "scheduler": "slurm" if step.scheduler == "slurm" else None, "nodes": nodes}

    def deliver(self, ledger: GoodputLedger) -> None:
        with self._lock:
            hints, self._hints = self._hints, []
        for _, kwargs in hints:
            try:
                ledger.record_steps(**kwargs)
            except HintError:
                pass  # refused, as the hint API would answer: the simulated job drops them

    def steps(self, job: str) -> int:
        """The last step the scenario's job completed (tests)."""
        return self._training[job].step if job in self._training else 0
