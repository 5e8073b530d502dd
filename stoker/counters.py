"""Counters stay counters: hardware counters wrap, reset and glitch; what we export never goes back.

`Monotonic` turns a raw reading into a running total. Each reading is judged
against the last one:

- it rose: the rise is traffic;
- it fell and the counter is known to be `width` bits wide, its last value fits
  in that width and the wrapped step is under 1/16 of the range (268 million
  events between two reads, beyond any queue counter's rate at 1 Hz): a wrap,
  the wrapped step is traffic;
- it fell to less than half of the last value: a reset of that counter alone
  (driver reload, hot plug). A reset restarts from zero, so the new raw value
  is what was counted since, and is traffic;
- it fell by less than half: a glitch (a torn or stale read), not a reset,
  since a restarted counter holds only what it counted since the reset. Nothing
  is counted, and the reading becomes the new baseline.

When the caller knows the most the counter can count per second (a link's
rate, a generous bound for events), a step beyond that over the time since
the last reading (at least `MIN_SECONDS`) is a glitch or a reset that
physics excludes, never traffic: nothing is counted, the reading becomes the
baseline. Without that bound a one-cycle zero near the top of a 32-bit
range reads as a wrap down and a 4-billion rise back.

`CounterSet` keys counters by tuples whose first element is their owner (an
RDMA port, an NFS mountpoint): `forget` drops an owner that is gone, `rebase`
starts an owner's counters from new baselines without a jump in the totals.
`Presence` says which owners have been gone longer than a grace period.
"""

from __future__ import annotations

from typing import Collection, Hashable

MIN_SECONDS = 1.0  # a counter may lag its traffic by its refresh period (hw_counters `lifespan`)
FORGET_AFTER = 300.0  # longer than a driver reload or a remount; Prometheus's own staleness horizon


class Monotonic:
    __slots__ = ("_at", "_last", "total", "width")

    def __init__(self, width: int | None = None):
        self.width = width
        self._last: float | None = None
        self._at: float | None = None
        self.total: float | None = None

    def update(self, raw: float, now: float | None = None, per_second: float | None = None) -> float:
        """The running total after reading `raw` at `now`; `per_second` bounds each step (see module doc)."""
        last, at = self._last, self._at
        self._last, self._at = raw, now
        if last is None:
            if self.total is None:
                self.total = float(raw)  # the count since boot, as node_exporter reports it
            return self.total
        if raw >= last:
            step = raw - last
        elif (self.width is not None and last < (1 << self.width)
              and (wrapped := raw + (1 << self.width) - last) < (1 << (self.width - 4))):
            step = wrapped
        elif 2 * raw < last:
            step = raw
        else:
            step = 0
        if per_second is not None and now is not None and at is not None:
            if step > per_second * max(now - at, MIN_SECONDS):
                step = 0
        self.total += step
        return self.total

    def rebase(self) -> None:
        """The next reading is a new baseline: nothing before it is counted, the total goes on."""
        self._last = None


class CounterSet:
    """`Monotonic` counters created on first sight, keyed by name; by `(owner, ...)` tuples
    where `forget` and `rebase` are used."""

    def __init__(self, width: int | None = None):
        self._width = width
        self._counters: dict = {}

    def __len__(self) -> int:
        return len(self._counters)

    def update(self, key, raw: float, now: float | None = None, per_second: float | None = None) -> float:
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = Monotonic(self._width)
        return counter.update(raw, now, per_second)

    def forget(self, owners: Collection[Hashable]) -> None:
        """Drop every counter of these owners: they are gone, and their state with them."""
        if owners:
            self._counters = {k: c for k, c in self._counters.items() if k[0] not in owners}

    def rebase(self, owner: Hashable) -> None:
        """Another source now feeds this owner's counters: its next readings are baselines."""
        for key, counter in self._counters.items():
            if key[0] == owner:
                counter.rebase()


class Presence:
    """When each owner was last seen, so that the state of those gone past the grace period is dropped.

    A port or mount that is briefly absent (driver reload, remount) keeps its
    totals and carries on; one gone for good must not keep memory forever.
    """

    def __init__(self, grace: float = FORGET_AFTER):
        self.grace = grace
        self._seen: dict[Hashable, float] = {}

    def seen(self, owner: Hashable, now: float) -> None:
        self._seen[owner] = now

    def gone(self, now: float) -> set[Hashable]:
        """The owners not seen for longer than the grace period, forgotten here as they are returned."""
        gone = {o for o, t in self._seen.items() if now - t > self.grace}
        for owner in gone:
            del self._seen[owner]
        return gone
