"""The verdict collector: starvation and checkpoints, from the other collectors' snapshots.

It reads no hardware; each cycle it assembles a `NodeView` from what the
collectors last sampled, follows the job on the GPUs, measures the evidence,
weighs it, runs the engine's machines over it (detect/engine.py), and hands
the exporter one immutable snapshot of the tick (detect/snapshot.py).
"""

from __future__ import annotations

import time
from collections import deque
from types import MappingProxyType
from typing import Callable

from stoker import logs
from stoker.agent.collector import Collector
from stoker.agent.jobs import JobAttributor
from stoker.agent.worker import CollectorError, Worker
from stoker.config import CheckpointConfig, DetectConfig
from stoker.detect.attribution import Attribution
from stoker.detect.checkpoint import CheckpointTracker
from stoker.detect.evidence import EvidenceTracker
from stoker.detect.goodput import GoodputLedger
from stoker.detect.job import JobTracker
from stoker.detect.causes import PENDING
from stoker.detect.engine import Engine, Verdict
from stoker.detect.peer import PeerJudge
from stoker.detect.snapshot import MountSnapshot, Snapshot, frozen
from stoker.detect.state import Saved, StateStore
from stoker.detect.view import NodeView, gpu_busy
from stoker.exporters import jobs as job_families
from stoker.exporters import peer as peer_families
from stoker.exporters import verdicts as verdict_families
from stoker.sources.jobs import JobSnapshot

log = logs.get("verdicts")

NO_EVIDENCE = "no network, storage or checkpoint evidence: input pipeline or CPU"
CARRIED = "as before the agent restarted; its evidence is being measured again"
RECENT_CHECKPOINTS = 5  # finished checkpoints kept per mount for the dashboards' table
STATE_TIMEOUT = 5.0  # seconds a read or write of the state file may take (a hung disk or NFS mount)


class VerdictCollector(Collector):
    name = "verdicts"

    def __init__(self, interval: float, detect: DetectConfig, checkpoint: CheckpointConfig,
                 view: Callable[[float], NodeView], clock: Callable[[], float] = time.monotonic,
                 state_file: str = "", jobs: JobAttributor | None = None, keep_state: bool = True):
        """`jobs`: who owns the GPU processes (agent/jobs.py), looked up before each tick's accounting;
        `keep_state` False: the state file is read, never written (`stoker check`)."""
        self.interval = interval
        self.config = detect
        self._view = view
        self._clock = clock
        self.job = JobTracker(detect)
        self.evidence = EvidenceTracker(detect)
        self.attribution = Attribution(detect)
        self.engine = Engine(detect)
        self.checkpoints = CheckpointTracker(checkpoint)
        self.goodput = GoodputLedger(detect, clock)  # where each job's time goes (detect/goodput.py)
        self.peer = PeerJudge()  # `host` that is a wait for the job's other nodes (detect/peer.py)
        self.jobs = jobs
        self.store = StateStore(state_file, detect.baseline_window, read_only=not keep_state) if state_file else None
        self._files = Worker("state")  # the state file's reads and writes, with a deadline (daemon threads)
        self._saved: tuple = ()  # `_state_key` as last saved
        self.busy: dict[tuple[str, str], float] = {}
        self.scores: dict[str, float] = {}
        self.source = ""  # where the busy ratio comes from: gpm, utilization, or both (per GPU)
        self.verdict = Verdict(None, None, None)
        self.snapshot = Snapshot(0.0, None, None, None)  # what the exporter renders: the last tick's
        self.previous: Saved | None = None  # what the last run saved, until the first job is seen
        self._reopen: list[dict] = []  # its open checkpoints, reopened with the next NFS snapshot
        self._seen_job = False
        self._carried = False  # the verdict is the last run's until evidence is measured again
        # Counters for the dashboards: what a 15 s scrape of 1 s gauges would miss.
        self.busy_seconds: dict[tuple[str, str], float] = {}  # integral of the busy ratio, per GPU
        self.job_present_seconds = 0.0  # time a job held the GPUs: the denominator of the starved time
        self.recent: dict[str, deque] = {}  # mountpoint -> (started, duration, bytes, outcome), newest last
        self._ended: dict[str, tuple[dict[str, int], tuple | None]] = {}  # outcomes, open checkpoint last tick
        self._last_t: float | None = None

    def configure(self, detect: DetectConfig, checkpoint: CheckpointConfig) -> None:
        """New thresholds; the job's level, the verdict and the checkpoints in progress carry on."""
        self.config = detect
        for part in (self.job, self.evidence, self.attribution, self.engine, self.goodput):
            part.config = detect
        self.checkpoints.config = checkpoint

    async def cycle(self) -> list[str]:
        view = self._view(self._clock())
        self.update(view, await self.jobs.refresh(view.gpu) if self.jobs is not None else None)
        if self.store is not None and (state := self._state_to_save()) is not None:
            try:  # file I/O: not on the event loop, and a disk that hangs holds up no cycle
                await self._files.call(self.store.save, *state, timeout=STATE_TIMEOUT)
            except CollectorError as exc:
                log.warning("cannot save the job state", path=self.store.path, error=str(exc))
        return []

    async def start(self) -> None:
        if self.store is not None:
            try:
                self.recall(await self._files.call(self.store.load, timeout=STATE_TIMEOUT))
            except CollectorError as exc:
                log.warning("saved job state unreadable; learning it afresh", path=self.store.path, error=str(exc))

    def recall(self, saved: Saved | None) -> None:
        """What the last run of the agent saved; used if the first job on the GPUs is the same."""
        self.previous = saved

    def persist(self) -> None:
        """`cycle`'s saving, in the caller's thread (the simulated clock's drive)."""
        if (state := self._state_to_save()) is not None:
            self.store.save(*state)

    def _resume(self, saved: Saved) -> None:
        """The same job as the last run's: its level now, its open checkpoints with the next NFS snapshot."""
        if saved.level is not None and self.job.baseline() is None:
            self.job.seed(self._clock(), saved.level)
            log.info("job level restored from the last run", level=_round(saved.level), path=self.store.path)
        self._reopen = saved.checkpoints
        if saved.cause is not None:
            self.engine.resume(self._clock(), saved.cause, saved.cold, saved.came_back)
            self._carried = True
            log.info("verdict carried over from the last run", cause=saved.cause)

    def _state_to_save(self) -> tuple | None:
        """The job's PIDs, level, open checkpoints and verdict, when due: a checkpoint opened, stalled or
        ended or the verdict changed since the last save, or `SAVE_EVERY` passed with something worth
        keeping. Nothing while the last run's state waits for the first job: it is still the state to keep."""
        if self.previous is not None:
            return None
        key = self._state_key()
        worth_keeping = any(key[1:]) or self.verdict.baseline is not None  # more than the PIDs
        if key == self._saved and not (worth_keeping and self.store.due()):
            return None
        self._saved = key
        a = self.engine.arbiter
        return self.job.pids, self.verdict.baseline, self.checkpoints.open_records(), a.cause and (
            a.cause, self.engine.starvation.cold, a.came_back)

    def _state_key(self) -> tuple:
        """What is saved at once when it changes: the job's PIDs (a GPU lost takes its rank's), the open
        checkpoints and the verdict."""
        return (self.job.pids, tuple((mp, m.active.started, m.active.source, m.active.stalled)
                      for mp, m in sorted(self.checkpoints.mounts.items()) if m.active is not None),
                self.engine.cause, self.engine.arbiter.came_back)

    def update(self, view: NodeView, jobs: JobSnapshot | None = None) -> Verdict:
        """One tick; `jobs`: the owners of the GPU processes, for the goodput accounting."""
        t = view.t
        dt = 0.0 if self._last_t is None else max(0.0, t - self._last_t)
        self._last_t = t
        self.job_present_seconds += dt if self.job.present else 0.0
        if self.job.update(t, view.gpu):
            self._new_job(t)
        self.busy = gpu_busy(view)
        for key, value in self.busy.items():
            self.busy_seconds[key] = self.busy_seconds.get(key, 0.0) + value * dt
        self._follow_source(view)
        busy = sum(self.busy.values()) / len(self.busy) if self.busy else None
        job, baseline = self.job.present, self.job.baseline()
        self.checkpoints.update(view.nfs, job and busy is not None and self._waiting(busy, baseline))
        if self._reopen and view.nfs is not None:
            reopened, self._reopen = self.checkpoints.restore(self._reopen), []
            if reopened:
                log.info("checkpoints still open from the last run", mountpoints=reopened)
        self._note_checkpoints()
        signals = [s for s in self.evidence.signals(view)  # a gone job's checkpoint draining explains no wait
                   if not (s.cause == "checkpoint" and self.checkpoints.inherited(s.source))]
        signals += self.checkpoints.signals()
        at_level = job and self.engine.starvation.at_level(busy, baseline)
        self.attribution.observe(t, signals, at_level)
        self.scores = self.attribution.scores()
        before = self.engine.cause
        cause = self.engine.update(t, busy, job, baseline, self.scores,
                                       self.attribution.scores(fresh_only=True), self.evidence.measured())
        if cause is None and job and busy is not None and not self.engine.starvation.low(busy, baseline):
            self.job.remember(t, busy)
        self._carried = self._carried and cause == before and not self.attribution.current()
        reasons = (self.attribution.reasons(cause) or [CARRIED if self._carried else NO_EVIDENCE]) if cause else []
        # -- the one place the engine's verdict is finalised (detect/peer.py): a `host` verdict without host
        #    evidence becomes `peer` when the job spans other nodes and nothing says the wait is local --
        was = self.peer.shown(before)
        cause, reasons = self.peer.judge(t, cause, reasons, view, self.scores, self.goodput, self.job.pids,
                                         at_level, busy)
        self.verdict = Verdict(cause, busy, baseline, reasons)
        if cause != was and cause:
            log.warning("GPUs starved", cause=cause, was=was, busy=_round(busy), baseline=_round(baseline),
                        evidence=reasons, scores={k: round(v, 2) for k, v in self.scores.items() if v})
        elif cause != was:
            log.info("GPUs no longer starved", was=was, busy=_round(busy))
        self.goodput.tick(t, view.gpu, jobs, cause, self.busy, self.checkpoints)
        self.snapshot = self._snapshot(t)
        return self.verdict

    def _snapshot(self, t: float) -> Snapshot:
        e, v = self.engine, self.verdict
        states = {name: m.state for name, m in e.causes.machines.items()}
        if e.arbiter.pending is not None:
            states[e.arbiter.pending.cause] = PENDING
        mounts = tuple(MountSnapshot(mp, m.state, m.active.source if m.active else None, m.inherited is not None,
                                     self.checkpoints.over_budget(m), m.last_started, m.last_progress,
                                     m.written_bytes, m.last_duration, frozen(m.outcomes),
                                     tuple(self.recent.get(mp, ())))
                       for mp, m in sorted(self.checkpoints.mounts.items()))
        # `states`, `scores` and `busy` are new each tick: read-only views suffice; the counters are copied
        return Snapshot(t, v.cause, v.busy, v.baseline, tuple(v.evidence), e.starvation.state,
                        MappingProxyType(states), MappingProxyType(self.scores),
                        frozen(self.peer.starved_seconds(e.seconds)), tuple(self.attribution.current()),
                        MappingProxyType(self.busy), frozen(self.busy_seconds), self.job_present_seconds, mounts,
                        self.peer.waiting, tuple(tr.signal for tr in self.attribution.traces.values()))

    def _note_checkpoints(self) -> None:
        """Keep each checkpoint that ended since the last tick (by the tracker or a hint) for the table
        of recent ones: a checkpoint shorter than a scrape is gone from the gauges before it is seen."""
        for mp, m in self.checkpoints.mounts.items():
            before, was_open = self._ended.get(mp, (m.outcomes, None))
            a = m.active
            # a checkpoint begun in the same tick has replaced the ended one's start and bytes
            started, written = was_open if a is not None and was_open is not None else (m.last_started,
                                                                                        m.written_bytes)
            for outcome, n in m.outcomes.items():
                for _ in range(n - before.get(outcome, 0)):
                    self.recent.setdefault(mp, deque(maxlen=RECENT_CHECKPOINTS)).append(
                        (started, m.last_duration, written, outcome))
            self._ended[mp] = (dict(m.outcomes), None if a is None else (a.started, m.written_bytes))
        for mp in set(self._ended) - set(self.checkpoints.mounts):
            self._ended.pop(mp)
            self.recent.pop(mp, None)

    def _new_job(self, t: float) -> None:
        """Another job holds the GPUs: its level, its evidence history and its verdict start afresh."""
        self.evidence.new_job()
        self.attribution.new_job()
        self.engine.new_job()
        if self._seen_job:  # not the first this agent sees: the last one's announced checkpoints are over
            self.checkpoints.job_changed()
        self._seen_job = True
        if self.previous is not None:  # only the first job seen can be the one the last run saved
            if _same_job(self.previous.pids, self.job.pids):
                self._resume(self.previous)
            self.previous = None
        log.info("job on the GPUs", processes=len(self.job.pids))

    def _follow_source(self, view: NodeView) -> None:
        """The busy ratio's source (GPM or utilisation and power): levels measured by one are not
        levels of the other, so a change of source makes the job's level be learned again."""
        sources = sorted({g.activity_source for g in view.gpu.gpus if g.up}) if view.gpu else []
        source = "+".join(sources)
        if source and source != self.source:
            if self.source:
                self.job.forget_level()
                log.warning("the busy ratio changes source; learning the job's level again", was=self.source,
                            now=source)
            self.source = source

    def _waiting(self, busy: float, baseline: float | None) -> bool:
        """The GPUs wait (what a synchronous checkpoint does to them), by the job's level when known."""
        return self.engine.starvation.waiting(busy, baseline)

    def families(self):
        return [*verdict_families.families(self.snapshot), *job_families.families(self.goodput),
                *peer_families.families(self.peer, self.goodput)]

    async def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _same_job(saved: frozenset[int], now: frozenset[int]) -> bool:
    """The job the last run saved: most of its PIDs are the saved ones (a GPU lost since, or a rank
    restarted, leaves the others); a relaunch has none of them."""
    return bool(now) and 2 * len(saved & now) > len(now)
