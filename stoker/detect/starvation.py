"""Are the GPUs starved? One small machine per job: ok, low, recovering.

Each sample of the node's busy ratio is judged against the job's level
(job.py) when it is known and usable (at least `idle_floor`):

| judgement | busy ratio |
| --- | --- |
| `low` | below `drop_ratio` x the level, or below `idle_floor` |
| `band` | between the starved line and `recover_ratio` x the level |
| `back` | at least `recover_ratio` x the level |

Without a usable level (the agent just started, a new job, a copy-bound job,
a busy ratio whose source changed) there is no band: `low` is below the cold
line, `back` above it. The cold line is `cold_floor` until a verdict holds,
then `min(cold_floor, 2 x its starved level)`: its starved level is the median
of what the GPUs did while it held, idle samples (below `idle_floor`) left out
(a job loading does nothing, and any work would read as a recovery);
`cold_floor` while only those were seen.

The machine (which cause, and whether one is named at all, is the arbiter's):

| state | on | to |
| --- | --- | --- |
| `ok` | the arbiter names a cause | `low` |
| `low` | a sample that recovers (below) | `recovering` |
| `recovering` | a `low` sample | `low` (a `band` sample keeps the count) |
| `recovering` | `Timings.recover` x recover_after of it (x flap_factor when damped) | `ok` |

A sample *recovers* when it is `back`; or, with a level, in the band when the
cause's evidence is gone (the infrastructure recovered, the job runs a little
slower), or after `Timings.new_normal` x recover_after in the band with its
cause no longer strong now (the job's new normal: a NAS still crawling that
costs the job a third keeps its verdict, and the level stays frozen). One low
sample alone does not restart that clock (a noisy job's dip); `Timings.jitter`
in a row do. Without a level, a sample recovers when the verdict's cause no
longer explains the wait and no other strong cause does (arbiter.py).
"""

from __future__ import annotations

import statistics
from collections import deque

from stoker.config import DetectConfig
from stoker.detect.causes import BACK, BAND, LOW
from stoker.detect.policy import TIMINGS

OK, RECOVERING = "ok", "recovering"
STATES = (OK, LOW, RECOVERING)


class Starvation:
    def __init__(self, config: DetectConfig):
        self.config = config
        self.state = OK
        self.cold = False  # the verdict (the current or last one) began without the job's level
        self.recovering_since: float | None = None
        self.in_band_since: float | None = None  # above the starved line, below the recovered one
        self.low_run = 0  # low samples in a row
        self.levels: deque[float] = deque(maxlen=TIMINGS.cold_levels)  # busy while starved, without a level

    # -- the judgement of a sample (pure) ---------------------------------------------------------

    def usable(self, level: float | None) -> float | None:
        """The job's level as a reference: a job whose level is itself idle (copy-bound, or holding
        the GPUs without running kernels) cannot be judged by it, only by strong evidence."""
        return level if level is not None and level >= self.config.idle_floor else None

    def low(self, busy: float, level: float | None) -> bool:
        """Below the job's level by the drop ratio, or idle once that level is known."""
        level = self.usable(level)
        return level is not None and (busy < self.config.idle_floor or busy < self.config.drop_ratio * level)

    def waiting(self, busy: float, level: float | None) -> bool:
        """The GPUs wait (what a synchronous checkpoint does to them): low by the job's level when
        known, else near idle."""
        if self.usable(level) is None:
            return busy < 2 * self.config.idle_floor
        return self.low(busy, level)

    def at_level(self, busy: float | None, level: float | None) -> bool:
        """Working as this job does, however little that is, with no verdict held over the window:
        evidence present then did not starve the GPUs (attribution.py tolerates it)."""
        if busy is None or self.state != OK:
            return False
        if level is None:
            return busy >= self.config.cold_floor
        return busy >= self.config.recover_ratio * level

    def cold_line(self) -> float:
        c = self.config
        if self.state == OK or not self.levels:
            return c.cold_floor
        return min(c.cold_floor, TIMINGS.cold_line * statistics.median(self.levels))

    def judge(self, busy: float, level: float | None) -> str:
        """`level`: usable (see `usable`)."""
        c = self.config
        if level is None:
            return LOW if busy < self.cold_line() else BACK
        if busy < c.idle_floor or busy < c.drop_ratio * level:
            return LOW
        return BACK if busy >= c.recover_ratio * level else BAND

    # -- the machine --------------------------------------------------------------------------------

    def begin(self, cold: bool) -> None:
        self.state, self.cold = LOW, cold
        self.recovering_since = self.in_band_since = None
        self.low_run = 0
        self.levels.clear()

    def starved_level(self, busy: float) -> None:
        """A sample of what the job does while a verdict holds without a level; idle ones are left out."""
        if busy >= self.config.idle_floor:
            self.levels.append(busy)

    def band(self, t: float, judgement: str) -> bool:
        """Follow the new-normal clock; True once it has run `Timings.new_normal` x recover_after."""
        self.low_run = self.low_run + 1 if judgement == LOW else 0
        if self.low_run >= TIMINGS.jitter:
            self.in_band_since = None
        elif judgement != LOW and self.in_band_since is None:
            self.in_band_since = t
        return self.in_band_since is not None and \
            t - self.in_band_since >= TIMINGS.new_normal * self.config.recover_after

    def follow(self, t: float, recovered: bool, starved: bool, damped: bool) -> bool:
        """One sample of a held verdict; True when it clears."""
        if recovered:
            self.state = RECOVERING
            self.recovering_since = t if self.recovering_since is None else self.recovering_since
        elif starved:
            self.state, self.recovering_since = LOW, None  # only a starved sample breaks a recovery
        c = self.config
        return self.recovering_since is not None and \
            t - self.recovering_since >= TIMINGS.recover * c.recover_after * (c.flap_factor if damped else 1.0)

    def end(self) -> None:
        self.state, self.recovering_since = OK, None
