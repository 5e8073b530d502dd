"""The NVML trace recorded on a real H200 (data/trace.csv), cut into its phases.

Rows were sampled at about 10 Hz; `phases.json` gives each phase's wall-clock
window. The simulated GPUs replay rows of the phase their node is in.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

ROW_HZ = 10.0
SETTLE_ROWS = 5
"""Rows cut from the start of each phase: the GPU was still leaving the previous
phase (the saturated phase opens with 0, 0, 0, 17% SM activity). A looped phase
must not replay that transition as if the workload dipped."""


@dataclass(frozen=True)
class Phase:
    name: str
    duration: float
    rows: tuple[dict[str, float], ...]


@lru_cache(maxsize=1)
def phases() -> dict[str, Phase]:
    data = resources.files("stoker.sim") / "data"
    with (data / "trace.csv").open() as fh:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    out: dict[str, Phase] = {}
    for p in json.loads((data / "phases.json").read_text()):
        inside = tuple(r for r in rows if p["start"] <= r["t"] <= p["end"])[SETTLE_ROWS:]
        out[p["phase"]] = Phase(p["phase"], p["end"] - p["start"], inside)
    return out


def row_at(phase: Phase, seconds_into_phase: float, offset: int = 0) -> dict[str, float]:
    """The phase's row for that moment, looping; `offset` staggers GPUs against each other."""
    return phase.rows[(int(seconds_into_phase * ROW_HZ) + offset) % len(phase.rows)]
