"""Goodput: where each job's wall time on this node went, and what its restarts cost.

Each verdict tick (`tick`) covers the time since the previous one and puts all
of it in exactly one state, for the node and for every job on its GPUs:

- `productive`: a job holds the GPUs, they are not starved, and they work
  (busy ratio at or above `idle_floor`);
- `storage`, `network`, `host`, `checkpoint`, `peer`: starved, by the verdict's cause
  (docs/VERDICTS.md; `peer`: waiting for the job's other nodes);
- `idle`: the job holds the GPUs and does not run kernels, and no verdict
  explains it (before the job's level is known, or a job whose level is idle);
- for the node only: `no_job` (no job holds a GPU) and `unknown` (NVML did not
  answer, so nobody knows).

So the node's states add up to its wall time since the agent started, and a
job's to its time on the node. The verdict is the node's: on a node shared by
several jobs, a starvation counts for each of them.

**Which job holds a GPU** (`Binding`): the scheduler's job of its compute
processes, from their cgroup or environment (sources/jobs.py; an environment
only where no scheduler's cgroup speaks: `_claims`), each process for itself
(one process's claim never labels another's PIDs); failing that,
a job that declared itself through step hints (the hint API's `job`, with its
PID or the GPUs it names, or the only job hinting on the node); else
`unknown`. **Which job a step hint counts for** (`_hinted_job`): the job of
the process it names, where that is a GPU process the agent sees; a hint that
names another job is refused, as the scheduler's cgroup is what the agent
measures the job's time and restarts by. Else the job the hint names (its own
account: never merged into another job's), else the only job on the GPUs.

A job is followed by its **process set**: when the PIDs of a job are
replaced by a disjoint set with the same job id (a relaunch, a requeue,
within `FORGET_AFTER` of the last sighting), it **restarted**, and the
productive seconds since its last completed checkpoint are **lost work**:
the checkpoint holds the state of its start, so the productive time since that
start is what must be done again. Steps hinted by the job give the same in
steps, exactly: the new run resumes at the step after the checkpoint.

**Steps** come from the job (`stoker.hints.step`): numbers increasing within
a run (one launch as the job names it); a step number already seen in the run
is a duplicate (a retried batch, a second rank); a replaced run that reports
newer steps counts again, unless the agent saw its processes go (then it
is stale: a late batch). Durations go to a histogram.

Anyone with the hint token can send steps in any job's name over TCP (no peer
credentials), so what one sender can do to a job's accounts is bounded by what
the node shows: a new run of a job whose processes the agent sees needs new
processes (a relaunch) while its current run reports, new runs come at most
every `NEW_RUN_EVERY`, a run's steps advance at most `MAX_STEP_RATE` a second,
and no more steps are lost than were reported. Nothing one request does lasts:
a run that claimed a job and went silent yields to the next within
`NEW_RUN_EVERY`, and a replaced run that reports again counts again.

Cardinality: at most `MAX_JOBS` jobs; a job neither on a GPU nor hinting for
`FORGET_AFTER` seconds is forgotten with its series.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from stoker import logs
from stoker.config import DetectConfig
from stoker.detect.checkpoint import HintError
from stoker.detect.policy import CAUSE_NAMES
from stoker.histogram import Histogram
from stoker.sources.jobs import JOB_ID, SLUID, JobSnapshot, Owner

if TYPE_CHECKING:
    from stoker.detect.checkpoint import CheckpointTracker
    from stoker.sources.gpu import GpuSnapshot

log = logs.get("goodput")

STATES = ("productive", "idle", *CAUSE_NAMES, "peer")  # a starved second goes to the verdict's cause
NODE_STATES = STATES + ("no_job", "unknown")
UNKNOWN = "unknown"
SCHEDULERS = ("slurm", "kubernetes", "none")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
"""A 1B model's step on 8 H100s takes a tenth of a second; a 70B model's with a large global batch, 10-30 s."""
FORGET_AFTER = 900.0
"""A job gone this long is forgotten: long enough for a Slurm requeue or a pod restart to count as a restart."""
DECLARED_FOR = 60.0
"""A job that hinted within this long is on the node for the purpose of claiming GPUs nobody else owns."""
MAX_JOBS = 16
RUNS_REMEMBERED = 8
NEW_RUN_EVERY = 30.0
"""A job's new runs come at most this often: a relaunch starts its processes, NCCL and a checkpoint
load before its first step. More are refused (429), so restarts counted from runs are relaunches."""
MAX_STEP_RATE = 1000.0
"""Steps a second a run can advance: ten times a 1B model's on 8 H100s. A step further ahead of the
run's last than this (plus one request's worth) is refused rather than made its last step."""
STEP_SLACK = 256
"""Steps one request may carry: a run advances at least this much from one batch to the next."""


@dataclass(frozen=True)
class Binding:
    job_id: str
    scheduler: str  # slurm | kubernetes | none
    source: str  # cgroup | environ | hint | none


@dataclass(frozen=True)
class StepRecord:
    step: int
    seconds: float | None = None  # since the previous step of the same process
    tokens: int | None = None  # of the whole step (the global batch), as the job counts them
    samples: int | None = None
    data_wait: float | None = None  # of `seconds`, waiting for the next batch (the input pipeline)


@dataclass(frozen=True)
class Declaration:
    t: float
    pid: int | None
    gpus: frozenset[str]  # UUIDs or NVML indexes the job says it uses


@dataclass
class Run:
    """One launch of a job, as its step hints name it."""

    last_step: int | None = None
    t: float = 0.0  # when it last brought a new step
    pids: frozenset[int] = frozenset()  # the job's processes when it began (none seen: not known)


@dataclass
class JobAccount:
    job_id: str
    scheduler: str = "none"
    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STATES})
    pids: frozenset[int] = frozenset()  # the current process set
    present: bool = False  # holds a GPU at the last tick
    last_seen: float = 0.0  # monotonic: last tick on a GPU, or last hint
    productive: float = 0.0
    saved: float = 0.0  # productive seconds a completed checkpoint (or the run's start) covers
    pending: dict[str, float] = field(default_factory=dict)  # mountpoint -> productive at its checkpoint's start
    restarts: int = 0
    lost_seconds: float = 0.0
    lost_steps: int = 0
    steps: int = 0
    tokens: int = 0
    samples: int = 0
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))
    run: str | None = None  # the run that brought the latest step
    runs: dict[str, Run] = field(default_factory=dict)  # it and the runs before it, RUNS_REMEMBERED at most
    new_run_at: float | None = None
    declared: Declaration | None = None
    data_wait_seconds: float | None = None  # waiting for the next batch, over the steps that said (hints)
    nodes: int | None = None  # the nodes the job says it spans (hints)

    @property
    def unsaved(self) -> float:
        """Productive seconds a restart now would lose."""
        return max(0.0, self.productive - self.saved)

    @property
    def last_step(self) -> int | None:
        """The last step of the run that reported last."""
        return self.runs[self.run].last_step if self.run is not None else None


class GoodputLedger:
    def __init__(self, config: DetectConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self.node = {s: 0.0 for s in NODE_STATES}
        self.jobs: dict[str, JobAccount] = {}
        self.gpus: dict[tuple[str, str], list[Binding]] = {}  # (index, uuid) -> jobs on it, at the last tick
        self._pid_owner: dict[int, Binding] = {}  # a GPU process -> its job (not unknown), at the last tick
        self._held_since: dict[tuple[str, str], tuple[frozenset[int], float]] = {}  # GPU -> (its processes, since)
        self._t: float | None = None
        self._mounts: dict[str, tuple[float | None, int]] = {}  # mountpoint -> (last start, completed)

    # -- each verdict tick ----------------------------------------------------------------------

    def tick(self, t: float, gpu: GpuSnapshot | None, jobs: JobSnapshot | None, cause: str | None,
             busy: dict[tuple[str, str], float], checkpoints: CheckpointTracker | None = None) -> None:
        dt = 0.0 if self._t is None else max(0.0, t - self._t)
        self._t = t
        held: dict[str, tuple[Binding, set[tuple[str, str]], set[int]]] = {}
        if gpu is not None:
            claims = _claims(gpu, jobs.owners if jobs is not None else {})
            self.gpus = self._bind(t, gpu, claims)
            self._pid_owner = {}
            for g in gpu.gpus:
                key = (str(g.index), g.uuid)
                own = claims.get(key, {})
                bindings = self.gpus.get(key, [])
                for b in bindings:
                    _, keys, pids = held.setdefault(b.job_id, (b, set(), set()))
                    keys.add(key)
                    # a process placed by its cgroup or environment is its own job's, not that of another
                    # process on the same GPU; a job that hinted (or unknown) holds all of the GPU's
                    pids.update([p for p in g.pids if p in own and own[p].job_id == b.job_id] if own else g.pids)
                declared = bindings[0] if bindings and bindings[0].source == "hint" else None
                for p in g.pids:  # whose each process is, for the step hints it sends: placed, else declared
                    owner = own.get(p)
                    mine = Binding(owner.job_id, owner.scheduler, owner.source) if owner is not None else declared
                    if mine is not None:
                        self._pid_owner[p] = mine
        else:
            self.gpus = {}
        node_busy = _mean(busy.values())
        if gpu is None or (held and node_busy is None):
            self.node["unknown"] += dt
        elif not held:
            self.node["no_job"] += dt
        else:
            self.node[self._state(cause, node_busy)] += dt
        for acct in self.jobs.values():
            acct.present = acct.job_id in held
        for job_id, (binding, keys, pids) in held.items():
            acct = self._account(job_id, binding.scheduler, t)
            if acct is None:
                continue
            self._follow(acct, frozenset(pids))
            acct.present, acct.last_seen = True, t
            job_busy = _mean(busy[k] for k in keys if k in busy)
            level = job_busy if job_busy is not None else node_busy
            if level is not None:
                state = self._state(cause, level)
                acct.seconds[state] += dt
                if state == "productive":
                    acct.productive += dt
        self._checkpoints(checkpoints)
        self._forget(t)

    def _state(self, cause: str | None, busy: float) -> str:
        if cause:
            return cause
        return "idle" if busy < self.config.idle_floor else "productive"

    def _bind(self, t: float, gpu: GpuSnapshot, claims: dict) -> dict[tuple[str, str], list[Binding]]:
        out = {}
        floor = self.config.job_memory_floor_bytes
        since = {}
        for g in gpu.gpus:
            if not g.up or not ((g.processes or 0) > 0 or (g.memory_used_bytes or 0) > floor):
                continue
            key, pids = (str(g.index), g.uuid), frozenset(g.pids)
            before = self._held_since.get(key)
            # the GPU's processes since when: a new set (not one rank replaced) is a new holder
            same = before is not None and (pids == before[0] or bool(pids & before[0]))
            since[key] = before if same else (pids, t)
            found = []
            for pid in g.pids:
                owner = claims.get(key, {}).get(pid)
                if owner is not None:
                    b = Binding(owner.job_id, owner.scheduler, owner.source)
                    if b not in found:
                        found.append(b)
            kept = self.gpus.get(key, [None])[0] if same else None  # a job that said it holds these processes
            kept = kept if kept is not None and kept.source == "hint" and kept.job_id in self.jobs else None
            out[key] = found or [self._declared_for(t, g, since[key][1], kept) or Binding(UNKNOWN, "none", "none")]
        self._held_since = since
        return out

    def _declared_for(self, t: float, g, held_since: float, kept: Binding | None) -> Binding | None:
        """A GPU no scheduler claims: the job that hinted from one of its processes; or, since these
        processes hold it, the job that named it; or the job that claimed these processes before
        (it still holds them in a checkpoint or an evaluation without steps); or the only job hinting
        on the node without naming its GPUs. A job that stopped hinting does not claim the processes
        that follow it."""
        declared = [a for a in self.jobs.values()
                    if a.declared is not None and t - a.declared.t <= DECLARED_FOR and a.job_id != UNKNOWN]
        for a in declared:
            if a.declared.pid is not None and a.declared.pid in g.pids:
                return Binding(a.job_id, a.scheduler, "hint")
        declared = [a for a in declared if a.declared.t >= held_since]
        for a in declared:
            if g.uuid in a.declared.gpus or str(g.index) in a.declared.gpus:
                return Binding(a.job_id, a.scheduler, "hint")
        if kept is not None:
            return kept
        anonymous = [a for a in declared if not a.declared.gpus]
        if len(anonymous) == 1:
            return Binding(anonymous[0].job_id, anonymous[0].scheduler, "hint")
        return None

    def _follow(self, acct: JobAccount, pids: frozenset[int]) -> None:
        """The job's process set: replaced by a disjoint one, it restarted (one rank replaced is the same run)."""
        if not pids:
            return
        if acct.pids and pids.isdisjoint(acct.pids) and acct.job_id != UNKNOWN:
            self._restart(acct, "its processes were replaced")
        acct.pids = pids
        if acct.run is not None and not acct.runs[acct.run].pids:  # it began before the agent saw its processes
            acct.runs[acct.run].pids = pids

    def _restart(self, acct: JobAccount, why: str) -> None:
        lost = acct.unsaved
        acct.restarts += 1
        acct.lost_seconds += lost
        acct.saved = acct.productive  # the new run starts from the checkpoint: nothing of it is unsaved yet
        acct.pending.clear()
        log.warning("job restarted", job=acct.job_id, why=why, lost_productive_seconds=round(lost, 1),
                    restarts=acct.restarts)

    def _checkpoints(self, tracker: CheckpointTracker | None) -> None:
        """A checkpoint that starts marks the productive time it will hold; one that completes saves it."""
        if tracker is None:
            return
        present = [a for a in self.jobs.values() if a.present]
        for mp, m in tracker.mounts.items():
            started, completed = m.last_started, m.outcomes.get("completed", 0)
            before = self._mounts.get(mp)
            self._mounts[mp] = (started, completed)
            if before is None:
                if m.active is not None:
                    for a in present:
                        a.pending.setdefault(mp, a.productive)
                continue
            if completed > before[1]:  # the mark of its start; none if it began and ended within this tick
                for a in present:
                    a.saved = max(a.saved, a.pending.pop(mp, a.productive))
            if started is not None and started != before[0] and m.active is not None:
                for a in present:
                    a.pending[mp] = a.productive
        for mp in [mp for mp in self._mounts if mp not in tracker.mounts]:
            del self._mounts[mp]

    def _account(self, job_id: str, scheduler: str, t: float, hinted: bool = False) -> JobAccount | None:
        """The job's account, opened if new. At `MAX_JOBS`, a job on a GPU takes the place of the one
        gone longest; a job that only hints is refused (HintError 429); None when nothing can go."""
        acct = self.jobs.get(job_id)
        if acct is None:
            if len(self.jobs) >= MAX_JOBS:
                idle = [a for a in self.jobs.values() if not a.present]
                if hinted:
                    raise HintError(f"the agent already follows {MAX_JOBS} jobs on this node", status=429)
                if not idle:
                    return None
                del self.jobs[min(idle, key=lambda a: a.last_seen).job_id]
            acct = self.jobs[job_id] = JobAccount(job_id, scheduler if scheduler in SCHEDULERS else "none",
                                                  last_seen=t)
            log.info("job seen", job=job_id, scheduler=acct.scheduler, hinted=hinted)
        elif acct.scheduler == "none" and scheduler in SCHEDULERS:
            acct.scheduler = scheduler
        return acct

    def _forget(self, t: float) -> None:
        for job_id in [j for j, a in self.jobs.items() if not a.present and t - a.last_seen > FORGET_AFTER]:
            del self.jobs[job_id]

    # -- step hints (the hint API, on the event loop) -------------------------------------------

    def record_steps(self, steps: Iterable[StepRecord], job: str | None = None, run: str | None = None,
                     pid: int | None = None, gpus: Iterable[str] = (), scheduler: str | None = None,
                     nodes: int | None = None) -> tuple[str, int, int]:
        """Steps a job reported: (the job they were counted for, accepted, duplicates or stale); `nodes`:
        how many nodes the job says it spans.
        Raises HintError, and counts nothing, when they cannot be the job's: 400 (no job to count them
        for, a step implausibly far ahead), 409 (the process is another job's, a new run from the
        processes of the current one), 429 (too many jobs, too many new runs)."""
        steps = sorted(steps, key=lambda s: s.step)
        t = self._clock()
        job_id = self._hinted_job(job, pid, scheduler)
        run = run or f"pid:{pid}"
        acct = self.jobs.get(job_id)
        if acct is not None and steps:
            self._check_run(acct, run, steps[-1].step, t)
        acct = self._account(job_id, scheduler or "none", t, hinted=acct is None)
        acct.declared = Declaration(t, pid, frozenset(gpus))
        acct.last_seen = max(acct.last_seen, t)
        if nodes is not None:
            acct.nodes = nodes
        if not steps:
            return job_id, 0, 0
        if run not in acct.runs:
            self._new_run(acct, run, steps[0].step, t)
        mine = acct.runs[run]
        if run != acct.run and mine.pids and mine.pids.isdisjoint(acct.pids):
            return job_id, 0, len(steps)  # a replaced run whose processes are gone: a late batch, stale
        accepted = 0
        for s in steps:
            if mine.last_step is not None and s.step <= mine.last_step:
                continue
            mine.last_step = s.step
            acct.steps += 1
            accepted += 1
            acct.tokens += s.tokens or 0
            acct.samples += s.samples or 0
            if s.seconds is not None:
                acct.step_seconds.observe(s.seconds)
                if s.data_wait is not None:
                    acct.data_wait_seconds = (acct.data_wait_seconds or 0.0) + min(s.data_wait, s.seconds)
        if accepted:  # a replaced run that still runs (or whose processes nobody sees) is the current one again
            mine.t, acct.run = t, run
        return job_id, accepted, len(steps) - accepted

    def _check_run(self, acct: JobAccount, run: str, top: int, t: float) -> None:
        """What the node says against these steps: a known run's steps advance at a plausible rate; a new
        run of a job whose processes the agent sees needs processes other than those of its current run,
        while that run reports; new runs come at most every NEW_RUN_EVERY. Any token holder can name any
        job, and without this one request could make another job's steps stale, lost or restarted for
        good. (Which of two runs claiming the same new processes is the job's, nobody can tell over TCP:
        the one that keeps reporting wins.)"""
        mine = acct.runs.get(run)
        if mine is not None:
            if mine.last_step is not None and top - mine.last_step > STEP_SLACK + MAX_STEP_RATE * (t - mine.t):
                raise HintError(f"step {top} of run {run} is {top - mine.last_step} steps past its step "
                                f"{mine.last_step} of {t - mine.t:.0f} s ago: more than {MAX_STEP_RATE:g} "
                                "steps a second", status=400)
            return
        if acct.run is None:
            return
        current = acct.runs[acct.run]
        if acct.pids and not acct.pids.isdisjoint(current.pids) and t - current.t < NEW_RUN_EVERY:
            raise HintError(f"a new run ({run}) of job {acct.job_id} is refused: the job still runs the processes "
                            f"that began its run {acct.run}, and a relaunch comes with new processes (steps of "
                            "something else go under another `job`)", status=409)
        if acct.new_run_at is not None and t - acct.new_run_at < NEW_RUN_EVERY:
            raise HintError(f"job {acct.job_id} began a new run {t - acct.new_run_at:.0f} s ago: at most one "
                            f"every {NEW_RUN_EVERY:g} s", status=429)

    def _new_run(self, acct: JobAccount, run: str, first: int, t: float) -> None:
        """A new launch of the job. It resumes at `first`: the steps from there to the last one of the run
        it replaces are done again, lost (never more than the job reported and had not lost yet). That
        run is the latest one begun on other processes than the job's now, where the agent sees them (a
        run that claimed the new processes before is not it); where it sees them and no run's are gone,
        nothing was relaunched and nothing is lost (a run quiet for NEW_RUN_EVERY, in a long checkpoint,
        yields to any token holder's new run, which counted every step of the job lost). Without a
        process set to follow (another PID namespace) it is the current one, and the job's restart."""
        if acct.run is not None:
            gone = [r for r in acct.runs.values() if r.pids and r.pids.isdisjoint(acct.pids)]
            before = max(gone, key=lambda r: r.t, default=None if acct.pids else acct.runs[acct.run])
            last = before.last_step if before is not None else None
            if last is not None and first <= last:
                acct.lost_steps += min(last - first + 1, acct.steps - acct.lost_steps)
            if not acct.pids:
                self._restart(acct, "it reports steps from a new run")
        acct.runs[run] = Run(None, t, acct.pids)
        acct.new_run_at = t
        while len(acct.runs) > RUNS_REMEMBERED:
            del acct.runs[min((r for r in acct.runs if r not in (run, acct.run)), key=lambda r: acct.runs[r].t)]

    def _hinted_job(self, job: str | None, pid: int | None, scheduler: str | None = None) -> str:
        """Whose steps. The job of the GPU process that sent them (same PID namespace: the agent knows),
        from its cgroup or environment: a hint naming another job is refused, never merged into either
        (the scheduler's id is the one the GPU time and restarts are counted under), but for Slurm's
        two names of one job. Else the job named, in its own account; else the job that declared that
        process, else the only job on the GPUs."""
        owner = self._pid_owner.get(pid) if pid is not None else None
        if owner is not None and owner.source != "hint":
            if job is not None and job != owner.job_id and not _slurm_names(owner, job, scheduler):
                raise HintError(f"pid {pid} is a process of job {owner.job_id} ({owner.scheduler}, from its "
                                f"{owner.source}), not of job {job}: send `job` {owner.job_id} or none (under a "
                                "scheduler, leave STOKER_JOB_ID unset)", status=409)
            return owner.job_id
        if job is not None:
            if not JOB_ID.fullmatch(job) or job == UNKNOWN:
                raise HintError("`job` must be 1-128 characters of letters, digits and ._:@+/-", status=400)
            return job
        if owner is not None:
            return owner.job_id
        on_gpus = {b.job_id for bindings in self.gpus.values() for b in bindings if b.job_id != UNKNOWN}
        if len(on_gpus) == 1:
            return on_gpus.pop()
        raise HintError("give `job`: no single job holds this node's GPUs", status=400)


def _claims(gpu: GpuSnapshot, owners: dict[int, Owner | None]) -> dict[tuple[str, str], dict[int, Owner]]:
    """The owners each GPU's processes may label it with (docs/JOBS.md). A scheduler's cgroup labels
    the GPUs of its own process. An environment (`SLURM_JOB_ID`: any process can set it) labels only
    the GPUs of its own process, never one a process in a scheduler's cgroup is on, and never with a
    job a scheduler's cgroup places on a GPU here (a real member of that job is in its cgroup)."""
    up = [g for g in gpu.gpus if g.up]
    placed = {o.job_id for g in up for p in g.pids if (o := owners.get(p)) is not None and o.source == "cgroup"}
    out = {}
    for g in up:
        mine = {p: o for p in g.pids if (o := owners.get(p)) is not None}
        scheduled = {p: o for p, o in mine.items() if o.source == "cgroup"}
        out[(str(g.index), g.uuid)] = scheduled or {p: o for p, o in mine.items() if o.job_id not in placed}
    return out


def _slurm_names(owner: Binding, job: str, scheduler: str | None) -> bool:
    """Whether `job`, a Slurm job id from the sender's environment (`scheduler` slurm: the helper's
    $SLURM_JOB_ID), is the other name of the Slurm job whose cgroup holds the sender: from 26.05 the
    cgroup is named by the job's SLUID unless `CgroupJobIdPaths=yes`, and SLURM_JOB_ID is the number
    (docs/JOBS.md); nothing maps one to the other, but one process is in one job."""
    names = (owner.job_id, job)
    return owner.scheduler == scheduler == "slurm" and any(
        SLUID.fullmatch(a) is not None and b.isascii() and b.isdigit() for a, b in (names, names[::-1]))


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
