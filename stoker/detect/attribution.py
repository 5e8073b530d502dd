"""Which cause explains the GPUs' wait: signals weighed by strength and by timing.

Each signal's history is kept as a `Trace`: when it was last seen, and how
long the GPUs kept their job's level while it was present. Its weight for the
ranking:

- strength: 1 at its threshold, growing with the log of how far past it
  (twice the threshold weighs 2, four times 3), capped at `Weights.most`;
- freshness: full while present, then fading to nothing over
  `evidence_memory` seconds, so evidence sampled a tick late, or an
  intermittent fault between its bursts, still counts (not a checkpoint:
  the tracker knows when one has ended);
- timing: a signal that was present for `tolerate_after` seconds while the
  GPUs ran at their level did not starve them then; it weighs a tenth, unless
  it has since grown to more than twice what was tolerated (`Weights.grown`). Evidence that
  appears with the drop outranks evidence that predates it. A slow or silent
  NAS weighs half until `prefetch_hides` seconds, a tenth after: the input
  pipeline's prefetch hides it until its buffer runs dry, so evidence that
  predates the drop by less can still be its cause, though not against
  evidence that appeared with the drop.

A cause's score is the weight of its strongest signal. A score of at least
`Weights.explains` explains a drop; `Weights.strong` is needed to call one
without knowing the job's level (the agent started during the incident). The
numbers are in policy.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stoker.config import DetectConfig
from stoker.detect.evidence import Signal
from stoker.detect.policy import CAUSE_NAMES, SIGNALS, WEIGHTS


def strength_score(signal: Signal) -> float:
    """1 at the threshold, one more for each doubling past it, at most `Weights.most`; an open
    checkpoint weighs `Weights.checkpoint`."""
    if signal.kind == "checkpoint":
        return WEIGHTS.checkpoint
    return min(WEIGHTS.most, 1.0 + math.log2(max(1.0, signal.strength)))


@dataclass
class Trace:
    signal: Signal
    last_seen: float
    tolerated_seconds: float = 0.0
    tolerated_strength: float = 0.0

    def tolerated(self, after: float) -> bool:
        return self.tolerated_seconds >= after and self.signal.strength <= WEIGHTS.grown * self.tolerated_strength


class Attribution:
    def __init__(self, config: DetectConfig):
        self.config = config
        self.traces: dict[tuple[str, str], Trace] = {}
        self.t: float | None = None

    def new_job(self) -> None:
        """A new job: what is only remembered belonged to the last one; what is present now is the
        node's state, and keeps what is known of it (a rail the last job ran at full speed without)."""
        for key in [k for k, tr in self.traces.items()
                    if tr.last_seen != self.t or SIGNALS[tr.signal.kind].of_the_job]:
            del self.traces[key]

    def observe(self, t: float, signals: list[Signal], at_level: bool) -> None:
        """Record this tick's signals; `at_level`: the GPUs ran at their job's level over it."""
        dt = 0.0 if self.t is None else max(0.0, t - self.t)
        self.t = t
        memory = self.config.evidence_memory
        for s in signals:
            trace = self.traces.get(s.key)
            if trace is None or t - trace.last_seen > memory:
                trace = self.traces[s.key] = Trace(s, t)  # new, or back after it was forgotten
            trace.signal, trace.last_seen = s, t
            if at_level:
                trace.tolerated_seconds += dt
                trace.tolerated_strength = max(trace.tolerated_strength, s.strength)
        for key in [k for k, tr in self.traces.items() if t - tr.last_seen > memory]:
            del self.traces[key]

    def timing(self, trace: Trace) -> float:
        """Full weight for evidence that appeared with the drop; less for what the GPUs worked through."""
        c = self.config
        if not SIGNALS[trace.signal.kind].prefetched:
            return WEIGHTS.tolerated if trace.tolerated(c.tolerate_after) else 1.0
        if trace.tolerated(c.prefetch_hides):
            return WEIGHTS.tolerated
        return WEIGHTS.predates if trace.tolerated(c.tolerate_after) else 1.0

    def weight(self, trace: Trace, fresh_only: bool = False) -> float:
        age = self.t - trace.last_seen
        if age > 0 and (fresh_only or SIGNALS[trace.signal.kind].present_only):
            return 0.0
        freshness = max(0.0, 1.0 - age / self.config.evidence_memory)
        return strength_score(trace.signal) * freshness * self.timing(trace)

    def scores(self, fresh_only: bool = False) -> dict[str, float]:
        out = dict.fromkeys(CAUSE_NAMES, 0.0)
        for trace in self.traces.values():
            cause = trace.signal.cause
            out[cause] = max(out[cause], self.weight(trace, fresh_only))
        return out

    def reasons(self, cause: str) -> list[str]:
        """The signals behind a cause, strongest first, worded for the operator."""
        ranked = sorted((tr for tr in self.traces.values() if tr.signal.cause == cause),
                        key=self.weight, reverse=True)
        return [tr.signal.text + ("" if tr.last_seen == self.t else f" ({self.t - tr.last_seen:.0f} s ago)")
                + (" (present before the drop)" if self.timing(tr) < 1 else "")
                for tr in ranked if self.weight(tr) > 0]

    def current(self) -> list[Signal]:
        """Signals seen in the latest window."""
        return [tr.signal for tr in self.traces.values() if tr.last_seen == self.t]
