"""Counters stay counters: hardware counters wrap and reset; what we export never goes back.

`Monotonic` turns a raw reading into a running total. A drop is a 32-bit wrap
when the counter is known to be 32 bits wide, its last value fits in 32 bits,
and the wrapped step is plausible (under 1/16 of the range: 268 million events
between two reads, beyond any queue counter's rate at 1 Hz; a driver reload, by
contrast, leaves a small new value far below a large old one); any other drop
is a reset of that counter alone (driver reload, hot plug): the new raw value counts as the increase
since the reset, so no negative step and no double count reaches Prometheus.
"""

from __future__ import annotations



class Monotonic:
    __slots__ = ("_last", "total", "width")

    def __init__(self, width: int | None = None):
        self.width = width
        self._last: float | None = None
        self.total = 0.0

    def update(self, raw: float) -> float:
        last = self._last
        self._last = raw
        if last is None:
            self.total = float(raw)
        elif raw >= last:
            self.total += raw - last
        elif (self.width is not None and last < (1 << self.width)
              and (step := raw + (1 << self.width) - last) < (1 << (self.width - 4))):
            self.total += step
        else:
            self.total += raw
        return self.total


class CounterSet:
    """`Monotonic` counters keyed by name, created on first sight."""

    def __init__(self, width: int | None = None):
        self._width = width
        self._counters: dict = {}

    def update(self, key, raw: float) -> float:
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = Monotonic(self._width)
        return counter.update(raw)
