"""Judge a run of a scenario against the expectations written in its file.

An expectation holds from `from` to `to` (scenario seconds): the verdict (or
the checkpoint state) must be reached within `within` seconds of `from`, and
then hold on at least `share` of the samples until `to`; verdicts listed in
`never` must not appear at all in that window. A run is right when every
expectation and the expected checkpoint outcomes hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stoker.sim.drive import Sample
from stoker.sim.scenarios import Expectation, Scenario


@dataclass
class Judgement:
    scenario: str
    failures: list[str] = field(default_factory=list)
    time_to_verdict: list[float] = field(default_factory=list)  # per verdict expectation that was reached
    flaps: int = 0  # verdict changes over the whole run

    @property
    def right(self) -> bool:
        return not self.failures


def _name(value: str | None) -> str:
    return value or "none"


def _check(e: Expectation, samples: list[Sample], what: str, expected: str, j: Judgement) -> None:
    window = [s for s in samples if e.start <= s.t < e.end]
    if not window:
        j.failures.append(f"{e.start:g}-{e.end:g} s: no samples (the run was too short)")
        return
    value = (lambda s: _name(s.cause)) if what == "verdict" else (lambda s: s.checkpoint)
    reached = next((s.t for s in window if value(s) == expected), None)
    label = f"{e.start:g}-{e.end:g} s: {what} {expected}"
    if reached is None:
        j.failures.append(f"{label} never reached (saw {sorted({value(s) for s in window})})")
        return
    begin = window[0].t  # the first sample of the window: `within` counts from there
    if reached - begin > e.within:
        j.failures.append(f"{label} reached after {reached - begin:.1f} s, allowed {e.within:g} s")
    if what == "verdict" and expected != "none":
        j.time_to_verdict.append(reached - begin)
    settled = [s for s in window if s.t >= begin + e.within]
    if settled:
        share = sum(1 for s in settled if value(s) == expected) / len(settled)
        if share < e.share:
            others = sorted({value(s) for s in settled if value(s) != expected})
            j.failures.append(f"{label} held on {100 * share:.0f}% of the samples, wanted {100 * e.share:.0f}% "
                              f"(also saw {', '.join(others)})")


def judge(scenario: Scenario, samples: list[Sample], outcomes: dict[str, int], checkpoints: bool = True) -> Judgement:
    """`checkpoints` False: the verdicts only, not the checkpoint states and outcomes (whose timing follows
    the checkpoint timers: a scenario played with other timers than the simulated node's)."""
    j = Judgement(scenario.name, flaps=sum(1 for a, b in zip(samples, samples[1:]) if a.cause != b.cause))
    for e in scenario.expect:
        if e.verdict is not None:
            _check(e, samples, "verdict", e.verdict, j)
        if e.checkpoint is not None and checkpoints:
            _check(e, samples, "checkpoint", e.checkpoint, j)
        seen = {_name(s.cause) for s in samples if e.start <= s.t < e.end}
        for forbidden in e.never:
            if forbidden in seen:
                j.failures.append(f"{e.start:g}-{e.end:g} s: verdict {forbidden} appeared")
    for outcome, count in (scenario.outcomes.items() if checkpoints else ()):
        if outcomes.get(outcome, 0) != count:
            j.failures.append(f"checkpoints {outcome}: {outcomes.get(outcome, 0)}, expected {count}")
    return j


def run_length(scenario: Scenario) -> float:
    """Long enough for every expectation (the last `to`); without any, one pass of the steps up to 10 minutes."""
    return max(e.end for e in scenario.expect) if scenario.expect else min(scenario.period, 600.0)
