"""The verdict collector: starvation and checkpoints, from the other collectors' snapshots.

It reads no hardware; each cycle it assembles a `NodeView` from what the
collectors last sampled and runs the detectors over it.
"""

from __future__ import annotations

import time
from typing import Callable

from stoker import logs
from stoker.agent.collector import Collector
from stoker.config import CheckpointConfig, DetectConfig
from stoker.detect.checkpoint import CheckpointTracker
from stoker.detect.starvation import StarvationDetector, Verdict
from stoker.detect.view import EvidenceTracker, NodeView, gpu_busy, job_present
from stoker.exporters import verdicts as verdict_families

log = logs.get("verdicts")


class VerdictCollector(Collector):
    name = "verdicts"

    def __init__(self, interval: float, detect: DetectConfig, checkpoint: CheckpointConfig,
                 view: Callable[[float], NodeView], clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.config = detect
        self._view = view
        self._clock = clock
        self.evidence = EvidenceTracker(detect)
        self.starvation = StarvationDetector(detect)
        self.checkpoints = CheckpointTracker(checkpoint)
        self._previous: NodeView | None = None
        self.busy: dict[tuple[str, str], float] = {}
        self.verdict = Verdict(None, None, None)

    def configure(self, detect: DetectConfig, checkpoint: CheckpointConfig) -> None:
        """New thresholds; the baseline, the verdict and the checkpoints in progress carry on."""
        self.config = self.evidence.config = self.starvation.config = detect
        self.checkpoints.config = checkpoint

    async def cycle(self) -> list[str]:
        self.update(self._view(self._clock()))
        return []

    def update(self, view: NodeView) -> Verdict:
        previous, self._previous = self._previous or view, view
        # evidence over the same window as the busy ratio: the last sampling interval
        evidence = self.evidence.evidence(previous, view)
        self.busy = gpu_busy(view)
        node_busy = sum(self.busy.values()) / len(self.busy) if self.busy else None
        job = job_present(view, self.config.job_memory_floor_bytes)
        self.checkpoints.update(view.nfs, view.t - previous.t, job and self._working(node_busy))
        before = self.starvation.cause
        self.verdict = self.starvation.update(view.t, node_busy, job, evidence, self.checkpoints.any_active())
        if self.verdict.cause != before and self.verdict.cause:
            log.warning("GPUs starved", cause=self.verdict.cause, was=before, busy=_round(node_busy),
                        baseline=_round(self.verdict.baseline), evidence=self.verdict.evidence)
        elif self.verdict.cause != before:
            log.info("GPUs no longer starved", was=before, busy=_round(node_busy))
        return self.verdict

    def _working(self, busy: float | None) -> bool:
        """The GPUs are back at their job's level (no hysteresis: a checkpoint ends when they are)."""
        baseline = self.starvation.baseline()
        if busy is None:
            return False
        return busy >= self.config.recover_ratio * baseline if baseline is not None else busy >= 2 * self.config.idle_floor

    def families(self):
        return verdict_families.families(self)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
