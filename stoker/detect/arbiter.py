"""The verdict: which cause the starved GPUs wait on, from the cause machines (causes.py).

Naming one (no verdict, the sample `low`):

- with the job's level: the explaining cause (`active` or `resolving`) with
  the highest score; with none, the residual (`host`) once `Timings.lag` low
  samples in a row had no cause present and every source has been measured;
- without it (the cold start): only a cause present and `Weights.strong` now;
  never the residual, which needs a level to be measured against.

While a verdict holds, on `low` samples only (nothing changes while the GPUs
recover):

| the verdict's cause | what replaces it |
| --- | --- |
| the residual, without evidence of its own | the best `active` cause, at once |
| no longer explaining (`inactive`, `resolved`) | the best explaining cause, at once; with none, the residual (with a level; without, the verdict ends: starvation.py) |
| `active` | an `active` cause outranking it by `Timings.margin` for `Timings.hold` x recover_after; a cause that `preempts` (a checkpoint), present and strong, at once |
| `resolving` (only remembered) | an `active` cause weighing more now than it does, on `Timings.replace` samples in a row; a weaker one after `Timings.hold` x recover_after |

A challenger that stops qualifying starts again. A verdict whose cause last
ended less than `flap_window` before it began is *damped* (policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.config import DetectConfig
from stoker.detect.causes import ACTIVE, RESOLVING, Causes
from stoker.detect.policy import POLICY, RESIDUAL, TIMINGS, WEIGHTS


@dataclass
class Challenge:
    cause: str
    since: float
    samples: int


class Arbiter:
    def __init__(self, config: DetectConfig):
        self.config = config
        self.cause: str | None = None
        self.since: float | None = None  # the verdict's start
        self.came_back = False  # its cause ended less than flap_window before the verdict began
        self.pending: Challenge | None = None
        self.ended: tuple[str, float] | None = None  # the last verdict's cause and end

    @property
    def damped(self) -> bool:
        return self.came_back and POLICY[self.cause].damped

    def name(self, t: float, causes: Causes, cold: bool, measured: bool) -> str | None:
        """A cause for GPUs newly low (or None: not yet, or nothing to name)."""
        if cold:
            best = causes.best((ACTIVE,), key="now")
            return best if best is not None and causes[best].now >= WEIGHTS.strong else None
        best = causes.best((ACTIVE, RESOLVING))
        if best is None and causes.lag >= TIMINGS.lag and measured:
            best = RESIDUAL
        return best

    def start(self, t: float, cause: str, came_back: bool | None = None) -> None:
        self.since = t
        self.set(cause)
        if came_back is not None:
            self.came_back = came_back

    def set(self, cause: str) -> None:
        self.cause, self.pending = cause, None
        self.came_back = self.ended is not None and self.ended[0] == cause and \
            self.since - self.ended[1] < self.config.flap_window

    def challenge(self, t: float, causes: Causes, cold: bool, measured: bool) -> None:
        """A low sample of a held verdict: does another cause take it over?"""
        incumbent = causes[self.cause]
        if incumbent.policy.residual and incumbent.state != ACTIVE:
            if (best := causes.best((ACTIVE,), but=self.cause)) is not None:
                self.set(best)
            return
        if not incumbent.explains:
            best = causes.best((ACTIVE, RESOLVING), but=self.cause)
            if best is None and not cold and causes.lag >= TIMINGS.lag and measured:
                best = RESIDUAL
            if best is not None:
                self.set(best)
            return
        best = causes.best((ACTIVE,), but=self.cause)
        if best is None:
            self.pending = None
            return
        rival = causes[best]
        outranks = rival.score >= TIMINGS.margin * incumbent.score
        if rival.policy.preempts and outranks and rival.now >= WEIGHTS.strong:
            self.set(best)
            return
        if incumbent.state == ACTIVE and not outranks:
            self.pending = None
            return
        p = self.pending
        self.pending = p = Challenge(best, p.since, p.samples + 1) if p and p.cause == best else Challenge(best, t, 1)
        heavier = incumbent.state == RESOLVING and rival.now > incumbent.score
        if (heavier and p.samples >= TIMINGS.replace) or t - p.since >= TIMINGS.hold * self.config.recover_after:
            self.set(best)

    def end(self, t: float | None) -> None:
        """No verdict from here; `t` None: the last one is forgotten too (another job's)."""
        self.ended = None if t is None else (self.cause, t) if self.cause is not None else self.ended
        self.cause = self.since = self.pending = None
