"""What the verdicts hand out each tick: one immutable snapshot.

The exporter (exporters/verdicts.py), `stoker replay` and `stoker check` read
this and nothing else of the engine: what a scrape renders is what the tick
decided, however the machines hold their state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from stoker.detect.evidence import Signal

EMPTY: Mapping = MappingProxyType({})


def frozen(d: dict) -> Mapping:
    """A read-only copy."""
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class MountSnapshot:
    """One checkpoint mount (checkpoint.py)."""

    mountpoint: str
    state: str  # idle | candidate | open | stalled | settling
    source: str | None  # of the open checkpoint: hint | detected
    inherited: bool  # what it writes now is a job's that is gone
    over_budget: bool
    started: float | None  # wall clock, the current or last checkpoint
    progress: float | None  # its last byte that reached the server
    written_bytes: float | None
    last_duration: float | None
    outcomes: Mapping[str, int]
    recent: tuple[tuple[float | None, float | None, float | None, str], ...]  # (started, seconds, bytes, outcome)

    @property
    def in_progress(self) -> bool:
        return self.state in ("open", "stalled")

    @property
    def stalled(self) -> bool:
        return self.state == "stalled"


@dataclass(frozen=True)
class Snapshot:
    t: float
    cause: str | None  # the verdict
    busy: float | None  # the node's busy ratio
    baseline: float | None  # the job's level
    evidence: tuple[str, ...] = ()  # the verdict's reasons, for the operator
    gpu_state: str = "ok"  # the GPU machine: ok | low | recovering
    cause_states: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # cause -> its machine's state (causes.py)
    scores: Mapping[str, float] = field(default_factory=lambda: EMPTY)  # cause -> weight of its evidence
    starved_seconds: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    signals: tuple[Signal, ...] = ()  # seen in the latest window
    busy_ratio: Mapping[tuple[str, str], float] = field(default_factory=lambda: EMPTY)  # (gpu, uuid) -> busy ratio
    busy_seconds: Mapping[tuple[str, str], float] = field(default_factory=lambda: EMPTY)
    job_present_seconds: float = 0.0
    checkpoints: tuple[MountSnapshot, ...] = ()
    collective_wait: float | None = None  # the GPUs wait in a collective: utilization - busy ratio (detect/peer.py)
    remembered: tuple[Signal, ...] = ()  # every signal still weighed (seen within evidence_memory): `stoker check`'s
