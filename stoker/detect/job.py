"""Which job holds the GPUs, and the level it sustains.

A job is on the node while a GPU runs a compute process or holds more than
`job_memory_floor_bytes` of framebuffer (processes in another PID namespace
are invisible to NVML; their memory is not). A new job begins when the GPUs
were released in between, or when the set of compute PIDs changes entirely
(a relaunch, a new allocation): its level is learned afresh, because a smaller
model's normal is not a starved big one.

The level is the median of the busy ratio over `baseline_window` seconds of
samples taken while the job was not starved, from its first sample above
`idle_floor` on (the loading before it is not its level); it is known once
`MIN_BASELINE_SAMPLES` samples are in. The median, because eval and logging
pauses that fill less than half of the window must not lower it, and because
a job's step-to-step jitter must not raise it above what the job does most of
the time (a high percentile of a noisy job would make its ordinary dips look
starved). It can be saved and restored across an agent restart (state.py), for
the same job only.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

from stoker.config import DetectConfig
from stoker.sources.gpu import GpuSnapshot

MIN_BASELINE_SAMPLES = 10


class JobTracker:
    def __init__(self, config: DetectConfig):
        self.config = config
        self.present = False
        self.pids: frozenset[int] = frozenset()
        self.started: float | None = None
        self.history: deque[tuple[float, float]] = deque()  # (t, busy) while not starved
        self._sorted: list[float] = []  # the busy ratios of `history`, in order: its median at each tick is a lookup
        self.worked = False  # the job has been seen above the idle floor

    def update(self, t: float, gpu: GpuSnapshot | None) -> bool:
        """Follow the GPUs' holder; True when a new job has just begun."""
        present, pids = self._holder(gpu)
        new = present and (not self.present or (bool(pids) and bool(self.pids) and not pids & self.pids))
        if new:
            self.forget_level()
            self.started = t
            self.worked = False
        if present and pids:
            self.pids = pids
        elif not present:
            self.pids = frozenset()
        self.present = present
        return new

    def _holder(self, gpu: GpuSnapshot | None) -> tuple[bool, frozenset[int]]:
        if gpu is None:
            return False, frozenset()
        up = [g for g in gpu.gpus if g.up]
        present = any((g.processes or 0) > 0 or (g.memory_used_bytes or 0) > self.config.job_memory_floor_bytes
                      for g in up)
        return present, frozenset(p for g in up for p in g.pids)

    def baseline(self) -> float | None:
        """The median of the window (statistics.median's: the mean of the middle two of an even count)."""
        levels, n = self._sorted, len(self._sorted)
        if n < MIN_BASELINE_SAMPLES:
            return None
        return levels[n // 2] if n % 2 else (levels[n // 2 - 1] + levels[n // 2]) / 2

    def forget_level(self) -> None:
        self.history.clear()
        self._sorted.clear()

    def remember(self, t: float, busy: float) -> None:
        """A sample of the job not starved. The oldest leave the window, but never the last few:
        after a starvation longer than the window the job's level is still what it was before. Idle
        samples before the job first works are its loading (minutes of it, for a large model), not its
        level."""
        self.worked = self.worked or busy >= self.config.idle_floor
        if not self.worked or not math.isfinite(busy):
            return
        self.history.append((t, busy))
        insort(self._sorted, busy)
        while len(self.history) > MIN_BASELINE_SAMPLES and self.history[0][0] < t - self.config.baseline_window:
            del self._sorted[bisect_left(self._sorted, self.history.popleft()[1])]

    def seed(self, t: float, level: float) -> None:
        """The level a previous run of the agent learned for this very job."""
        for _ in range(MIN_BASELINE_SAMPLES):
            self.remember(t, level)
