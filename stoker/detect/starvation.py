"""Are the node's GPUs starved, and by what?

Starved: a job is on the GPUs and their busy ratio (GPM SM activity, the
average over the last sampling window) falls below `drop_ratio` of the level
that job sustains (the 90th percentile of its recent healthy samples), or below
`idle_floor` whatever its history. Relative, because a small model never
saturates an H100 and would otherwise look starved all the time.

Hysteresis: the verdict clears only after `recover_after` seconds above
`recover_ratio` of the baseline, and a cause changes only after the new cause
has held for `recover_after` seconds; so a noisy signal does not flap it.

Evidence can trail the GPUs by a sampling interval (mountstats and the GPUs are
sampled on their own ticks): with no evidence at all, the verdict waits one
more low sample before saying `host`, and during its first `recover_after`
seconds a `host` verdict gives way at once to the first real evidence.

Cause, from the same window, first that applies: `checkpoint` (one is in
progress), `network` (a used rail down, or congestion, PFC pause or
retransmissions above thresholds), `storage` (NFS READ latency or queueing,
reads stopped, NAS probe slow or hung), else `host` (input pipeline or CPU).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stoker.config import DetectConfig
from stoker.detect.view import Evidence

CAUSES = ("storage", "network", "checkpoint", "host")
MIN_BASELINE_SAMPLES = 10


@dataclass
class Verdict:
    cause: str | None
    busy: float | None
    baseline: float | None
    evidence: list[str] = field(default_factory=list)


def attribute(evidence: Evidence, checkpoint_active: bool) -> tuple[str, list[str]]:
    if checkpoint_active:
        return "checkpoint", ["a checkpoint is in progress"]
    if evidence.network:
        return "network", evidence.network
    if evidence.storage:
        return "storage", evidence.storage
    return "host", ["no network, storage or checkpoint evidence: input pipeline or CPU"]


class StarvationDetector:
    def __init__(self, config: DetectConfig):
        self.config = config
        self._history: deque[tuple[float, float]] = deque()  # (t, busy) while not starved
        self.cause: str | None = None
        self.evidence: list[str] = []
        self._above_since: float | None = None
        self._pending: tuple[str, float] | None = None  # a different cause, since when
        self._entered: float | None = None
        self._unexplained_lows = 0
        self.seconds: dict[str, float] = {c: 0.0 for c in CAUSES}
        self._last_t: float | None = None

    def baseline(self) -> float | None:
        if len(self._history) < MIN_BASELINE_SAMPLES:
            return None
        ordered = sorted(b for _, b in self._history)
        return ordered[int(0.9 * (len(ordered) - 1))]

    def update(self, t: float, busy: float | None, job: bool, evidence: Evidence,
               checkpoint_active: bool) -> Verdict:
        if self.cause is not None and self._last_t is not None:
            self.seconds[self.cause] += max(0.0, t - self._last_t)
        self._last_t = t
        c = self.config
        if busy is None or not job:
            self._clear()
            return Verdict(None, busy, self.baseline())
        baseline = self.baseline()
        low = busy < c.idle_floor or (baseline is not None and busy < c.drop_ratio * baseline)
        high = busy >= 2 * c.idle_floor and (baseline is None or busy >= c.recover_ratio * baseline)
        cause, why = attribute(evidence, checkpoint_active)
        if self.cause is None:
            if low and (cause != "host" or self._unexplained_lows >= 1):
                self.cause, self.evidence, self._above_since, self._pending = cause, why, None, None
                self._entered, self._unexplained_lows = t, 0
            elif low:
                self._unexplained_lows += 1
            else:
                self._unexplained_lows = 0
                self._remember(t, busy)
        else:
            if high:
                self._above_since = self._above_since if self._above_since is not None else t
                if t - self._above_since >= c.recover_after:
                    self._clear()
                    self._remember(t, busy)
                    return Verdict(None, busy, baseline)
            else:
                self._above_since = None
            self._switch(t, cause, why)
        return Verdict(self.cause, busy, baseline, list(self.evidence))

    def _switch(self, t: float, cause: str, why: list[str]) -> None:
        if cause == self.cause:
            self._pending = None
            self.evidence = why
            return
        if self.cause == "host" and t - self._entered < self.config.recover_after:
            self.cause, self.evidence, self._pending = cause, why, None  # the evidence arrived late
            return
        if self._pending is None or self._pending[0] != cause:
            self._pending = (cause, t)
        elif t - self._pending[1] >= self.config.recover_after:
            self.cause, self.evidence, self._pending = cause, why, None

    def _remember(self, t: float, busy: float) -> None:
        self._history.append((t, busy))
        while self._history and self._history[0][0] < t - self.config.baseline_window:
            self._history.popleft()

    def _clear(self) -> None:
        self.cause, self.evidence, self._above_since, self._pending = None, [], None, None
        self._unexplained_lows = 0
