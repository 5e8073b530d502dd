"""Scenarios of the simulated node: which recorded GPU phase plays when.

A scenario is a loop of steps; each step names the recorded GPU phase the
eight simulated GPUs replay and how long it lasts.
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.sim import trace


@dataclass(frozen=True)
class Step:
    gpu_phase: str
    duration: float


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    description: str

    @property
    def period(self) -> float:
        return sum(s.duration for s in self.steps)

    def at(self, t: float) -> tuple[Step, float]:
        """The step in force `t` seconds after start, and how far into it we are."""
        t %= self.period
        for step in self.steps:
            if t < step.duration:
                return step, t
            t -= step.duration
        return self.steps[-1], self.steps[-1].duration


def _recorded() -> tuple[Step, ...]:
    return tuple(Step(p.name, p.duration) for p in trace.phases().values())


SCENARIOS = {
    "cycle": lambda: Scenario("cycle", _recorded(), "walks through every recorded phase in turn"),
    "healthy": lambda: Scenario("healthy", (Step("saturated", 60.0),), "a training job keeping the GPUs busy"),
}

DEFAULT = "cycle"


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(sorted(SCENARIOS))})") from None
