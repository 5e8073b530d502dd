"""The simulated XE9680: 8 GPUs in one job, walking through a scenario."""

from __future__ import annotations

import time
from typing import Callable

from stoker.sim import scenarios, trace

GPU_COUNT = 8
ROW_STAGGER = 7  # rows between neighbouring GPUs, so they move alike but not in lockstep


class SimNode:
    def __init__(self, scenario: str | scenarios.Scenario = scenarios.DEFAULT, gpu_count: int = GPU_COUNT,
                 clock: Callable[[], float] = time.monotonic, skip: float = 0.0):
        """`skip` seconds of the scenario are taken as already past (`stoker check` starts in the fault)."""
        self.scenario = scenarios.get(scenario) if isinstance(scenario, str) else scenario
        self.gpu_count = gpu_count
        self.clock = clock
        self.started = clock() - skip

    def elapsed(self) -> float:
        return self.clock() - self.started

    def gpu_phase(self, t: float | None = None) -> str:
        step, _ = self.scenario.at(self.elapsed() if t is None else t)
        return step.gpu_phase

    def step(self) -> scenarios.Step:
        """The scenario step in force now."""
        return self.scenario.at(self.elapsed())[0]

    def lost_gpus(self) -> tuple[int, ...]:
        return self.step().lost_gpus

    def gpu_row(self, gpu: int, t: float) -> dict[str, float]:
        step, into = self.scenario.at(t)
        return trace.row_at(trace.phases()[step.gpu_phase], into, gpu * ROW_STAGGER)


class Ticker:
    """Simulated time for one model of the node (NICs, mounts): now, and how long since its last tick."""

    def __init__(self, node: SimNode):
        self.node = node
        self._last: float | None = None

    def tick(self) -> tuple[float, float]:
        t = self.node.elapsed()
        dt = 0.0 if self._last is None else max(0.0, t - self._last)
        self._last = t
        return t, dt
