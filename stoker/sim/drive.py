"""Drive the simulated node and the detectors tick by tick on a manual clock.

The same sources, collectors' parsing and detectors as the agent, without its
schedules and threads: ten minutes of a scenario run in seconds, the same way
every time. The NAS probes, real child processes on real time in the agent,
are modelled from the simulated NAS: every `probes.interval` seconds, and
unanswered from the first probe after a mount stops answering. `restart()` replaces the agent's side
(sources, counters, verdicts) while the node's kernel moves on, as an agent
restarted in the middle of an incident does.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass

from stoker import config as config_mod
from stoker.agent.verdicts import VerdictCollector
from stoker.detect import evidence
from stoker.detect.view import NodeView, ProbeState
from stoker.sim.simulation import Simulation
from stoker.sources.gpu import GpuSource
from stoker.sources.jobs import JobSource
from stoker.sources.netdev import EthtoolReader, snapshot
from stoker.sources.nfs import NfsSource
from stoker.sources.pressure import PressureSource
from stoker.sources.rdma import RdmaSource


class ManualClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MISSED = 7  # on a loaded machine, a source misses one tick in this many

HEALTHY_PROBE = {"write": 0.012, "read": 0.005, "metadata": 0.001}  # seconds, on the simulated NAS


@dataclass(frozen=True)
class Sample:
    t: float  # scenario seconds
    cause: str | None
    checkpoint: str  # none | in_progress | stalled
    busy: float | None


class SimDrive:
    def __init__(self, scenario, root: str, interval: float = 1.0, skip: float = 0.0,
                 cfg: config_mod.Config | None = None, noise: random.Random | None = None):
        """`skip`: the agent starts that many seconds into the scenario (a restart during an incident).
        `noise`: a loaded machine, drawn from it: each tick comes 0.7-1.5 intervals after the last, and
        each source misses a tick (its last snapshot seen again) one time in `MISSED`."""
        self.noise = noise
        self._last: dict[str, object] = {}
        self.clock = ManualClock(0.0)
        self.interval = interval
        self.sim = Simulation(scenario, root, clock=self.clock, skip=skip, name="")  # one node: the scenario's ids
        self.config = self.sim.configure(cfg or config_mod.load())
        self.platform = self.sim.platform()
        self.samples: list[Sample] = []
        self.restarts = [r for r in self.sim.node.scenario.restarts if r > skip]  # still to come
        self.gpu: GpuSource | None = None
        self.restart()

    @property
    def history(self) -> list[tuple[float, str | None]]:
        return [(s.t, s.cause) for s in self.samples]

    def restart(self) -> None:
        """A fresh agent on the same node: new sources and counters, no learned level, no evidence."""
        cfg = self.config
        self._last.clear()
        if self.gpu is not None:
            self.gpu.close()
            if self.sim.node.scenario.state == "lost" and cfg.agent.state_file:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(cfg.agent.state_file)
        self.gpu = GpuSource(self.platform.nvml, clock=self.clock, wall=self.clock)
        self.rdma = RdmaSource(cfg.agent.sysfs_root, clock=self.clock,
                               every_cycle=evidence.CONGESTION + evidence.RETRANSMITS)  # as the agent reads it
        self.ethtool = EthtoolReader(self.platform.open_ethtool)
        self.nfs = NfsSource(cfg.agent.procfs_root, cfg.nfs.operations, cfg.nfs.roles())
        self.host = PressureSource(cfg.agent.procfs_root)
        self.jobs = JobSource(cfg.agent.procfs_root, cfg.agent.sysfs_root, clock=self.clock)
        self.verdicts = VerdictCollector(self.interval, cfg.detect, cfg.checkpoint, view=None, clock=self.clock,
                                         state_file=cfg.agent.state_file)
        if self.verdicts.store is not None:
            self.verdicts.store._wall = self.clock
            self.verdicts.recall(self.verdicts.store.load())  # the agent does this in a worker thread
        self.verdicts.checkpoints._wall = self.clock

    def step(self):
        self.clock.advance(self.interval * (self.noise.uniform(0.7, 1.5) if self.noise else 1.0))
        self.sim.advance()
        self.sim.deliver_hints(self.verdicts.checkpoints, self.verdicts.goodput)
        rdma = self._sampled("rdma", self.rdma.sample)
        names = [p.interface for p in rdma.ports]
        stats, problems = self.ethtool.read(names)
        self.view = NodeView(self.clock(), gpu=self.gpu.sample(), rdma=rdma,
                             net=self._sampled("net", lambda: snapshot(names, self.sim.network.operstates(), stats,
                                                                        problems)),
                             nfs=self._sampled("nfs", self.nfs.sample), host=self._sampled("host", self.host.sample),
                             probes=self._probes())
        gpu = self.view.gpu
        owners = self.jobs.resolve(p for g in gpu.gpus if g.up for p in g.pids) if gpu else None
        verdict = self.verdicts.update(self.view, owners)  # the agent looks the owners up in a worker thread
        if self.verdicts.store is not None:
            self.verdicts.persist()  # the agent does this in a worker thread
        self.samples.append(Sample(self.sim.node.elapsed(), verdict.cause, self.checkpoint_state(), verdict.busy))
        return verdict

    def _sampled(self, source: str, sample):
        """A source's snapshot this tick: on a loaded machine, now and then the last one again (the
        collector missed its tick; the verdicts see no new window for it)."""
        if self.noise is None or source not in self._last or self.noise.random() >= 1 / MISSED:
            self._last[source] = sample()
        return self._last[source]

    def _probes(self) -> list[ProbeState]:
        now, every = self.sim.node.elapsed(), self.config.probes.interval
        out = []
        for m in self.sim.storage.mounts:
            since = self.sim.storage.blocked_since.get(m.mountpoint)
            unanswered = 0.0 if since is None else max(0.0, now - math.ceil(since / every) * every)
            out.append(ProbeState(m.mountpoint, unanswered, dict(HEALTHY_PROBE)))
        return out

    def checkpoint_state(self) -> str:
        active = [m.active for m in self.verdicts.checkpoints.mounts.values() if m.active is not None]
        if any(a.stalled for a in active):
            return "stalled"
        return "in_progress" if active else "none"

    def outcomes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.verdicts.checkpoints.mounts.values():
            for outcome, n in m.outcomes.items():
                out[outcome] = out.get(outcome, 0) + n
        return out

    def run(self, seconds: float) -> None:
        """Step through `seconds`, restarting the agent where the scenario says so (before the
        first sample at or past each restart time)."""
        end = self.sim.node.elapsed() + seconds
        while self.sim.node.elapsed() < end - self.interval / 2:  # ticks may come late (`noise`)
            if self.restarts and self.sim.node.elapsed() + self.interval >= self.restarts[0] - 1e-9:
                self.restarts.pop(0)
                self.restart()
            self.step()

    def first(self, cause: str | None, after: float = 0.0) -> float | None:
        """Scenario time of the first verdict `cause` at or after `after`."""
        return next((s.t for s in self.samples if s.t >= after and s.cause == cause), None)

    def changes(self) -> int:
        return sum(1 for a, b in zip(self.samples, self.samples[1:]) if a.cause != b.cause)

    def close(self) -> None:
        self.gpu.close()
