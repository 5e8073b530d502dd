"""Drive the simulated node and the detectors second by second on a manual clock.

The same sources and detectors as the agent, without its schedules: a minute
of simulated time runs in a fraction of a second, deterministically.
"""

from __future__ import annotations

from stoker import config
from stoker.agent.verdicts import VerdictCollector
from stoker.detect.view import NodeView
from stoker.sim.simulation import Simulation
from stoker.sources.gpu import GpuSource
from stoker.sources.netdev import EthtoolReader, snapshot
from stoker.sources.nfs import NfsSource
from stoker.sources.rdma import RdmaSource
from tests.conftest import ManualClock


class SimDrive:
    def __init__(self, scenario, root: str, interval: float = 1.0):
        self.clock = ManualClock(0.0)
        self.interval = interval
        self.sim = Simulation(scenario, root, clock=self.clock)
        self.config = self.sim.configure(config.load())
        platform = self.sim.platform()
        self.gpu = GpuSource(platform.nvml, clock=self.clock, wall=self.clock)
        self.rdma = RdmaSource(self.config.agent.sysfs_root, clock=self.clock)
        self.ethtool = EthtoolReader(platform.open_ethtool)
        self.nfs = NfsSource(self.config.agent.procfs_root, self.config.nfs.operations, self.config.nfs.roles())
        self.verdicts = VerdictCollector(interval, self.config.detect, self.config.checkpoint, view=None,
                                         clock=self.clock)
        self.verdicts.checkpoints._wall = self.clock
        self.history: list[tuple[float, str | None]] = []

    def step(self):
        self.clock.advance(self.interval)
        self.sim.advance()
        rdma = self.rdma.sample()
        names = [p.interface for p in rdma.ports]
        stats, problems = self.ethtool.read(names)
        view = NodeView(self.clock(), gpu=self.gpu.sample(), rdma=rdma,
                        net=snapshot(names, self.sim.network.operstates(), stats, problems), nfs=self.nfs.sample())
        self.view = view
        verdict = self.verdicts.update(view)
        self.history.append((self.sim.node.elapsed(), verdict.cause))
        return verdict

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / self.interval)):
            self.step()

    def first(self, cause: str | None, after: float = 0.0) -> float | None:
        """Scenario time of the first verdict `cause` at or after `after`."""
        return next((t for t, c in self.history if t >= after and c == cause), None)

    def changes(self) -> int:
        return sum(1 for (_, a), (_, b) in zip(self.history, self.history[1:]) if a != b)
