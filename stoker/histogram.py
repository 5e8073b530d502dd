"""A histogram kept by hand, for families built from a snapshot (a scrape renders it, never observes)."""

from __future__ import annotations

from bisect import bisect_left


class Histogram:
    """Counts per bucket of `bounds` (upper bounds, ascending) and their sum; `buckets()` gives the
    cumulative counts as a HistogramMetricFamily takes them."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += n
            out.append((bound, running))
        return out
