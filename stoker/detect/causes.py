"""By what: one machine per cause, like an alerting rule's pending / firing / resolved.

Each tick a cause has a score (attribution.py: its strongest signal, weighed by
strength, freshness and timing) and a score now (this window's signals only).
Its machine:

| state | when | explains a wait |
| --- | --- | --- |
| `inactive` | score below `Weights.explains` | no |
| `active` | score at least that, and present now (or a source has no window yet: not measured absent) | yes |
| `resolving` | remembered, measured absent now | yes |
| `resolved` | absent while the GPUs starved for `Timings.resolve` x recover_after (x flap_factor once it came back) | no |

The resolving clock starts at a low sample while a verdict holds (a band
sample does not stop it) and is reset when the GPUs are back at their level (a
recovery between an intermittent fault's bursts is not the fault's absence
while they starve); every clock starts afresh when no verdict holds. A `resolved` cause stays
so until present again, and then it has *come back*: an intermittent fault's
gaps are its own, so its later gaps wait `flap_factor` times longer. The
arbiter (arbiter.py) reads these states; `pending` is the arbiter's: a cause
present that challenges the verdict's cause and has not yet held long enough.
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.config import DetectConfig
from stoker.detect.policy import CAUSES, TIMINGS, WEIGHTS, CausePolicy

INACTIVE, PENDING, ACTIVE, RESOLVING, RESOLVED = "inactive", "pending", "active", "resolving", "resolved"
STATES = (INACTIVE, PENDING, ACTIVE, RESOLVING, RESOLVED)
"""The `state` label of stoker_cause_state."""

LOW, BAND, BACK = "low", "band", "back"
"""A sample's judgement (starvation.py): below the starved line, between the lines, at the level."""


@dataclass
class CauseMachine:
    policy: CausePolicy
    state: str = INACTIVE
    score: float = 0.0  # weighed, remembered evidence included
    now: float = 0.0  # this window's evidence only
    absent_since: float | None = None  # measured absent while the GPUs starve, since when
    lapsed: bool = False  # resolved during this verdict
    returned: bool = False  # present again after it resolved during this verdict

    @property
    def explains(self) -> bool:
        return self.state in (ACTIVE, RESOLVING)

    def update(self, t: float, score: float, now: float, measured: bool, holding: bool, judgement: str,
               config: DetectConfig) -> None:
        self.score, self.now = score, now
        absent = now == 0 and measured
        if not holding:
            self.absent_since, self.lapsed, self.returned = None, False, False
        elif not absent or judgement == BACK:
            self.absent_since = None
        elif judgement == LOW and self.absent_since is None:
            self.absent_since = t
        if score < WEIGHTS.explains:
            self.state = INACTIVE
        elif not absent:
            self.returned = self.returned or self.lapsed
            self.lapsed, self.state = False, ACTIVE
        elif (self.state == RESOLVED and holding) or (
                self.absent_since is not None and t - self.absent_since >= self.resolve_after(config)):
            self.lapsed, self.state = True, RESOLVED
        else:
            self.state = RESOLVING

    def resolve_after(self, config: DetectConfig) -> float:
        return TIMINGS.resolve * config.recover_after * (config.flap_factor if self.returned else 1.0)


class Causes:
    """Every cause's machine, in the order of `CAUSES` (the first wins a tie), and the lag: samples
    in a row low against the job's level with no cause present."""

    def __init__(self) -> None:
        self.machines = {p.name: CauseMachine(p) for p in CAUSES}
        self.lag = 0

    def __getitem__(self, cause: str) -> CauseMachine:
        return self.machines[cause]

    def update(self, t: float, scores: dict[str, float], now: dict[str, float], measured: bool, holding: bool,
               judgement: str, leveled: bool, config: DetectConfig) -> None:
        """`leveled`: the judgement is against the job's level (not the cold line)."""
        for name, m in self.machines.items():
            m.update(t, scores[name], now[name], measured, holding, judgement, config)
        quiet = leveled and judgement == LOW and not any(m.state == ACTIVE for m in self.machines.values())
        self.lag = self.lag + 1 if quiet else 0

    def best(self, states: tuple[str, ...], but: str | None = None, key: str = "score") -> str | None:
        """The highest-scoring cause in one of `states` (other than `but`)."""
        found = [m for name, m in self.machines.items() if m.state in states and name != but]
        return max(found, key=lambda m: getattr(m, key)).policy.name if found else None

    def reset(self) -> None:
        for m in self.machines.values():
            m.absent_since, m.lapsed, m.returned = None, False, False
        self.lag = 0
