"""`stoker replay`: a scenario played on a simulated clock, its verdict timeline printed and judged.

Each line is a change: of the verdict, the checkpoint state, the GPU machine (ok, low, recovering) or a
cause machine (every cause not `inactive`, with its state: why a verdict holds, or has not yet cleared).

A replay's length is bounded before it starts (`limits`): an agent cycle takes 4-5 ms of CPU on
the simulated clock, so `MAX_CYCLES` is about eight minutes; `--interval 1e-6` would never have
ended."""

from __future__ import annotations

from typing import TextIO

from stoker.config import INTERVAL, Config
from stoker.detect.causes import INACTIVE
from stoker.sim.drive import SimDrive
from stoker.sim.judge import Judgement, judge, run_length
from stoker.sim.rundir import run_directory
from stoker.sim.scenarios import Scenario, ScenarioError

MAX_CYCLES = 100_000
"""A day at the default 1 s interval."""


def limits(scenario: Scenario, interval: float, seconds: float | None) -> None:
    """ScenarioError unless the interval is one the agent accepts and the replay stays within `MAX_CYCLES`."""
    low, high = INTERVAL
    if not low <= interval <= high:
        raise ScenarioError(f"--interval: must be between {low:g} and {high:g} seconds, got {interval!r}")
    total = seconds if seconds is not None else run_length(scenario)
    if total / interval > MAX_CYCLES:
        raise ScenarioError(f"{scenario.name}: {total:g} s at {interval:g} s intervals is {total / interval:.0f} "
                            f"agent cycles, more than {MAX_CYCLES}: give a longer --interval or fewer --seconds")


def play(scenario: Scenario, cfg: Config, interval: float, seconds: float | None, out: TextIO) -> Judgement:
    with run_directory("replay") as root:
        drive = SimDrive(scenario, root, interval, cfg=cfg)
        try:
            total = seconds if seconds is not None else run_length(scenario)
            print(f"{scenario.name}: {scenario.description}", file=out)
            print(f"{'t (s)':>7}  {'verdict':<11} {'checkpoint':<12} {'busy':>5}  {'gpus':<10} {'causes':<32} "
                  "evidence", file=out)
            last = None
            for _ in range(int(round(total / interval))):
                before = len(drive.samples)
                drive.run(interval)
                for sample in drive.samples[before:]:
                    snap = drive.verdicts.snapshot
                    machines = " ".join(f"{c}:{s}" for c, s in snap.cause_states.items() if s != INACTIVE)
                    state = (sample.cause, sample.checkpoint, snap.gpu_state, machines)
                    if state != last:
                        busy = "-" if sample.busy is None else f"{100 * sample.busy:.0f}%"
                        evidence = "; ".join(snap.evidence[:3])
                        print(f"{sample.t:7.1f}  {sample.cause or 'none':<11} {sample.checkpoint:<12} {busy:>5}  "
                              f"{snap.gpu_state:<10} {machines or '-':<32} {evidence}", file=out)
                        last = state
            judgement = judge(scenario, drive.samples, drive.outcomes())
        finally:
            drive.close()
    if scenario.expect or scenario.outcomes:
        verdict = "RIGHT" if judgement.right else "WRONG"
        print(f"\n{verdict}: {len(scenario.expect)} expectations, {judgement.flaps} verdict changes", file=out)
        for failure in judgement.failures:
            print(f"  - {failure}", file=out)
    return judgement
