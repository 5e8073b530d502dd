"""One tick of "are the node's GPUs starved, and by what?": the three machines in turn.

1. The sample is judged against the job's level (starvation.py: low, band, back).
2. Each cause's machine follows its evidence (causes.py: inactive, active,
   resolving, resolved).
3. With no verdict, the arbiter names a cause for a low sample (arbiter.py);
   with one, the GPU machine follows the recovery and, on low samples, the
   arbiter hears challengers. Without a level, a verdict stands on its
   evidence: once its cause no longer explains the wait and no other strong
   cause is present, it recovers (a cold verdict never turns into the
   residual: nothing says the job is below its level).

Each machine reads the others only through this order, within the tick; the
one value carried from the tick before is whether a verdict held, which tells
attribution whether the GPUs ran at their level over the window just measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stoker.config import DetectConfig
from stoker.detect.arbiter import Arbiter
from stoker.detect.causes import BACK, LOW, RESOLVED, Causes
from stoker.detect.policy import CAUSE_NAMES, WEIGHTS
from stoker.detect.starvation import Starvation


@dataclass
class Verdict:
    cause: str | None
    busy: float | None
    baseline: float | None
    evidence: list[str] = field(default_factory=list)


class Engine:
    def __init__(self, config: DetectConfig):
        self.starvation = Starvation(config)
        self.causes = Causes()
        self.arbiter = Arbiter(config)
        self.seconds = dict.fromkeys(CAUSE_NAMES, 0.0)  # time starved, by cause
        self._last_t: float | None = None

    @property
    def config(self) -> DetectConfig:
        return self.starvation.config

    @config.setter
    def config(self, config: DetectConfig) -> None:
        self.starvation.config = self.arbiter.config = config

    @property
    def cause(self) -> str | None:
        return self.arbiter.cause

    def update(self, t: float, busy: float | None, job: bool, level: float | None,
               scores: dict[str, float], now: dict[str, float], measured: bool = True) -> str | None:
        """`scores`: every remembered signal weighed, by cause; `now`: this window's only; `measured`
        False: some source has no window yet, so a cause's missing evidence is not absent."""
        if self.arbiter.cause is not None and self._last_t is not None:
            self.seconds[self.arbiter.cause] += max(0.0, t - self._last_t)
        self._last_t = t
        if busy is None or not job:
            self.end(t)
            return None
        g, a = self.starvation, self.arbiter
        level = g.usable(level)
        judgement = g.judge(busy, level)
        self.causes.update(t, scores, now, measured, a.cause is not None, judgement, level is not None, self.config)
        if a.cause is None:
            if judgement == LOW and (cause := a.name(t, self.causes, level is None, measured)) is not None:
                a.start(t, cause)
                g.begin(cold=level is None)
                if level is None:
                    g.starved_level(busy)
            return a.cause
        m = self.causes[a.cause]
        gone = not m.policy.residual and m.score < WEIGHTS.explains and measured
        if level is None:
            ended = gone or (not m.policy.residual and m.state == RESOLVED)
            if ended and judgement != BACK and (other := a.name(t, self.causes, True, measured)) is not None \
                    and other != a.cause:
                a.set(other)  # its cause is over, another starves the GPUs now: not a recovery
                ended = False
            recovered = judgement == BACK or ended
            starved = not recovered
            if starved:
                g.starved_level(busy)
        else:
            starved = judgement == LOW
            new_normal = g.band(t, judgement)
            recovered = judgement == BACK or (not starved and (gone or (new_normal and m.now < WEIGHTS.strong)))
        if not recovered and starved:
            a.challenge(t, self.causes, level is None, measured)
        if g.follow(t, recovered, starved, a.damped):
            self.end(t)
        return a.cause

    def resume(self, t: float, cause: str, cold: bool, came_back: bool = False) -> None:
        """The verdict the agent's last run held (state.py): followed from here as if never left, so a
        restart does not read as a recovery (nor an intermittent fault's return as a new one, whose
        recovery is not damped); its evidence is measured again within a window."""
        if cause in CAUSE_NAMES:
            self.arbiter.start(t, cause, came_back)
            self.starvation.begin(cold)

    def new_job(self) -> None:
        """Another job: no verdict, and the last job's verdicts are not this one's to come back."""
        self.end(None)

    def end(self, t: float | None) -> None:
        """The verdict ends at `t` (None: it was another job's, and is forgotten)."""
        self.arbiter.end(t)
        self.starvation.end()
        self.causes.reset()
