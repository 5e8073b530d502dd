"""Are the node's GPUs starved, and by what?

Low: a job is on the GPUs and their busy ratio (GPM SM activity, the average
over the last sampling window) is below `drop_ratio` of the level that job
sustains (job.py), or below `idle_floor` once that level is known. Relative,
because a small model never saturates an H100 and would otherwise look starved
all the time.

Cold start: before the job's level is known (the agent just started, or a new
job did), a busy ratio below the absolute `cold_floor` is starved only when
fresh, strong evidence explains it (a NAS crawling, a congested fabric, CPU
pressure, a checkpoint). A small model on healthy infrastructure has no such
evidence and stays unflagged; such a verdict ends when the GPUs reach twice
its starved level (idle samples left out; the cold floor while only those were
seen) or when its evidence goes away, unless another cause's strong evidence
takes the verdict over.

Cause: the best-ranked explanation (attribution.py); `host` when nothing
explains the drop (the input pipeline or the CPU), after one more low sample,
since evidence can trail the GPUs by a sampling interval (and the GPUs can
trail the evidence: a verdict whose evidence is gone turns `host` only on the
second low sample without it).

Hysteresis: the verdict clears `recover_after` seconds after the busy ratio
came back above `recover_ratio` of the level, if no starved sample came in
between (a jittery one does not count); a verdict that came back less than
`flap_window` seconds after the same cause cleared needs a recovery
`flap_factor` times longer (an intermittent fault reads as one starvation,
not a flapping one). While
starved, `host` without evidence of its own yields at once to a cause with
evidence, a cause whose evidence is gone yields to the best remaining one, and
in the first `recover_after` seconds the best-ranked cause is taken at once
(evidence can arrive a tick after the drop); later one cause replaces another
after outranking it by `SWITCH_MARGIN` for `recover_after` seconds, or after
two samples in which it is present and outranks a cause only remembered; a
cause only remembered yields to one present now, however weaker, after
`recover_after` seconds (to `host` when none is present; `flap_factor` times
longer once its evidence came back after such a gap), and never displaces the
verdict's cause; a checkpoint writing now that outranks the cause is taken
at once. Nothing switches while the GPUs are recovering.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stoker.config import DetectConfig
from stoker.detect.attribution import CAUSES, MIN_SCORE, STRONG

SWITCH_MARGIN = 1.5
COLD_LEVELS = 300  # the last samples of a cold verdict whose median is its starved level
IN_BAND_CLEARS_AFTER = 10
"""Times `recover_after`: between the starved and the recovered line that long, a job runs at a new level."""


@dataclass
class Verdict:
    cause: str | None
    busy: float | None
    baseline: float | None
    evidence: list[str] = field(default_factory=list)


@dataclass
class _Starved:
    cause: str
    since: float
    cold: bool  # entered before the job's level was known
    came_back: bool = False  # the same cause had cleared less than flap_window before this verdict began
    unexplained: int = 0  # low samples in a row since the cause's evidence went
    levels: deque[float] = field(default_factory=lambda: deque(maxlen=COLD_LEVELS))  # busy while starved (cold)
    recovering_since: float | None = None
    in_band_since: float | None = None  # above the starved line, below the recovered one, since when
    pending: tuple[str, float, int] | None = None  # a cause outranking this one: since when, samples
    absent_since: float | None = None  # the cause's evidence measured absent on starved samples since when
    left_absent: str | None = None  # the cause `host` took over from when its evidence was absent
    flickering: set[str] = field(default_factory=set)  # causes whose evidence came back after such a gap
    low_run: int = 0  # starved samples in a row (one alone in the band is a noisy job's jitter)


class StarvationDetector:
    def __init__(self, config: DetectConfig):
        self.config = config
        self.state: _Starved | None = None
        self._unexplained_lows = 0
        self._ended: tuple[str, float] | None = None  # the last verdict's cause and end
        self.seconds: dict[str, float] = {c: 0.0 for c in CAUSES}
        self._last_t: float | None = None
        self._measured = True

    @property
    def cause(self) -> str | None:
        return self.state.cause if self.state else None

    def usable(self, baseline: float | None) -> float | None:
        """The job's level as a reference: a job whose level is itself idle (copy-bound, or holding
        the GPUs without running kernels) cannot be judged by it, only by strong evidence."""
        return baseline if baseline is not None and baseline >= self.config.idle_floor else None

    def low(self, busy: float, baseline: float | None) -> bool:
        """Below the job's level by the drop ratio, or idle once that level is known."""
        baseline = self.usable(baseline)
        return baseline is not None and (busy < self.config.idle_floor or busy < self.config.drop_ratio * baseline)

    def at_level(self, busy: float | None, baseline: float | None) -> bool:
        """Working as this job does (however little that is): evidence present now did not starve it."""
        if busy is None or self.state is not None:
            return False
        if baseline is None:
            return busy >= self.config.cold_floor
        return busy >= self.config.recover_ratio * baseline

    def update(self, t: float, busy: float | None, job: bool, baseline: float | None,
               scores: dict[str, float], fresh: dict[str, float], measured: bool = True) -> str | None:
        """One tick; `scores` weigh every remembered signal by cause, `fresh` only this window's;
        `measured` False: some source has no window yet, so a cause's missing evidence is not gone."""
        self._measured = measured
        if self.state is not None and self._last_t is not None:
            self.seconds[self.state.cause] += max(0.0, t - self._last_t)
        self._last_t = t
        if busy is None or not job:
            self.clear(t)
            return None
        baseline = self.usable(baseline)
        best = max(CAUSES, key=lambda k: scores[k])
        explained = best if scores[best] >= MIN_SCORE else None
        if self.state is None:
            self._enter(t, busy, baseline, explained, fresh)
        else:
            self._follow(t, busy, baseline, scores, fresh, explained)
        return self.cause

    def _enter(self, t: float, busy: float, baseline: float | None, explained: str | None,
               fresh: dict[str, float]) -> None:
        c = self.config
        if self.low(busy, baseline):
            if explained is not None or (self._unexplained_lows >= 1 and self._measured):
                self._start(t, explained or "host", cold=False)
            else:
                self._unexplained_lows += 1
            return
        self._unexplained_lows = 0
        if baseline is None and busy < c.cold_floor:
            cause = max(CAUSES, key=lambda k: fresh[k])
            if fresh[cause] >= STRONG:
                self._start(t, cause, cold=True)
                self._starved_level(busy)

    def _start(self, t: float, cause: str, cold: bool) -> None:
        self.state = _Starved(cause, t, cold)
        self._came_back()
        self._unexplained_lows = 0

    def _starved_level(self, busy: float) -> None:
        """A cold verdict's starved level, against which its recovery is judged: what the job does while
        starved; idle samples (a job loading, a checkpoint holding every GPU) would set it at nothing, and
        then any work at all would read as a recovery."""
        if busy >= self.config.idle_floor:
            self.state.levels.append(busy)

    def _other_now(self, fresh: dict[str, float], floor: float) -> str | None:
        """The best cause but the verdict's whose evidence now is at least `floor`."""
        best = max((k for k in CAUSES if k != self.state.cause), key=lambda k: fresh[k])
        return best if fresh[best] >= floor else None

    def _came_back(self) -> None:
        s, ended = self.state, self._ended
        s.came_back = ended is not None and ended[0] == s.cause and s.since - ended[1] < self.config.flap_window

    def _set_cause(self, cause: str) -> None:
        s = self.state
        s.cause, s.pending, s.unexplained, s.absent_since, s.left_absent = cause, None, 0, None, None
        self._came_back()

    def _follow(self, t: float, busy: float, baseline: float | None, scores: dict[str, float],
                fresh: dict[str, float], explained: str | None) -> None:
        s, c = self.state, self.config
        evidence_gone = s.cause != "host" and scores[s.cause] < MIN_SCORE and self._measured
        if baseline is None:  # a cold verdict, or one whose level is being learned again (another busy source)
            # twice what the job does starved, or the cold floor while nothing but idle was seen starved
            line = min(c.cold_floor, max(2 * sorted(s.levels)[len(s.levels) // 2], 2 * c.idle_floor)) \
                if s.levels else c.cold_floor
            back = busy >= line
            if evidence_gone and not back and (other := self._other_now(fresh, STRONG)) is not None:
                self._set_cause(other)  # its cause is over, another starves the GPUs now: not a recovery
                evidence_gone = False
            recovered = back or evidence_gone
            starved = not recovered
            if starved:
                self._starved_level(busy)
        else:
            starved = baseline is not None and self.low(busy, baseline)
            s.low_run = s.low_run + 1 if starved else 0
            if s.low_run >= 2:
                s.in_band_since = None
            elif not starved and s.in_band_since is None:
                s.in_band_since = t
            # back at the level; or above the starved line with the cause's evidence gone (the infrastructure
            # recovered, the job runs a little slower), or there long enough, the cause no longer strong
            # now, to be the job's new normal (a NAS still crawling that costs the job a third is not one)
            recovered = baseline is not None and (busy >= c.recover_ratio * baseline or (not starved and (
                evidence_gone or (t - s.in_band_since >= IN_BAND_CLEARS_AFTER * c.recover_after
                                  and fresh.get(s.cause, 0.0) < STRONG))))
        if recovered:
            s.recovering_since = t if s.recovering_since is None else s.recovering_since
        elif starved:
            s.recovering_since = None  # only a starved sample breaks a recovery; a jittery one does not
            self._switch(t, scores, fresh, explained)
        damped = s.came_back and s.cause != "checkpoint"  # a checkpoint's end is known, not guessed
        if s.recovering_since is not None and t - s.recovering_since >= c.recover_after * (
                c.flap_factor if damped else 1.0):
            self.clear(t)

    def _switch(self, t: float, scores: dict[str, float], fresh: dict[str, float], explained: str | None) -> None:
        s = self.state
        absent = s.cause != "host" and fresh[s.cause] == 0 and self._measured
        s.absent_since = (t if s.absent_since is None else s.absent_since) if absent else None
        if explained == s.cause and absent and (present := self._other_now(fresh, MIN_SCORE)) is not None:
            explained = present  # the cause is only remembered; another is here now
        elif explained is None or explained == s.cause:
            s.pending = None
            gone = explained is None and s.cause != "host" and scores[s.cause] < MIN_SCORE and self._measured
            s.unexplained = s.unexplained + 1 if gone else 0
            # its evidence is gone and, one sample later, nothing else explains the wait; or it is only
            # remembered, measured absent while the GPUs stay starved for `recover_after` (`flap_factor`
            # times that once its evidence came back after such a gap: an intermittent fault's gaps)
            wait = self.config.recover_after * (self.config.flap_factor if s.cause in s.flickering else 1.0)
            if s.unexplained >= 2 or (absent and t - s.absent_since >= wait):
                left = s.cause if absent else None
                self._set_cause("host")
                s.left_absent = left
            return
        remembered = fresh[explained] == 0 and self._measured  # measured absent now
        if ((s.cause == "host" and fresh["host"] < MIN_SCORE and not remembered)
                or (s.cause != "host" and scores[s.cause] < MIN_SCORE)
                or t - s.since < self.config.recover_after):
            if s.cause == "host" and explained == s.left_absent:
                s.flickering.add(explained)  # back after the gap that made the verdict `host`
            self._set_cause(explained)
            return
        if remembered:
            s.pending = None  # only remembered: it does not displace the cause of the wait now
            return
        outranks = scores[explained] >= SWITCH_MARGIN * scores[s.cause]
        replaces = fresh[s.cause] == 0 and fresh[explained] > scores[s.cause]  # present against remembered
        succeeds = fresh[s.cause] == 0 and fresh[explained] >= MIN_SCORE  # present against remembered, weaker
        if not (outranks or replaces or succeeds):
            s.pending = None
            return
        if explained == "checkpoint" and outranks and fresh[explained] >= STRONG:
            self._set_cause(explained)  # a checkpoint writing now is a fact, and explains the whole wait
            return
        since, samples = (s.pending[1], s.pending[2] + 1) if s.pending and s.pending[0] == explained else (t, 1)
        s.pending = (explained, since, samples)
        if (replaces and samples >= 2) or t - since >= self.config.recover_after:
            self._set_cause(explained)

    def resume(self, t: float, cause: str, cold: bool, came_back: bool = False) -> None:
        """The verdict the agent's last run held (detect/state.py): followed from here as if never left,
        so a restart does not read as a recovery (nor an intermittent fault's return as a new one, whose
        recovery is not damped); its evidence is measured again within a window."""
        if cause in CAUSES:
            self.state = _Starved(cause, t, cold, came_back)

    def new_job(self) -> None:
        """Another job: no verdict, and the last job's verdicts are not this one's to come back."""
        self.state, self._ended, self._unexplained_lows = None, None, 0

    def clear(self, t: float) -> None:
        if self.state is not None:
            self._ended = (self.state.cause, t)
        self.state = None
        self._unexplained_lows = 0
