"""Pressure stall information from `<procfs>/pressure/{cpu,memory,io}` (Linux >= 4.20, `psi=1`).

Each file holds `some` (and `full`) lines with `total=` microseconds during
which some (all) runnable tasks were stalled on that resource. The totals are
counters; the verdicts take their rate over a window as the share of time the
host's tasks waited for a CPU or for memory: a CPU-bound input pipeline shows
here as positive evidence for the `host` cause, instead of a cause found only
by elimination. A kernel without PSI has no such files: the snapshot is empty,
which is not an error. Each file is read as every kernel file is (files.read_regular:
a regular file, never blocking, one page at most), and a total is a u64 in
decimal or nothing (a longer one overflowed the float of its counter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stoker.counters import CounterSet
from stoker.sources.files import DIGITS, NotRegularFile, PAGE, read_regular

RESOURCES = ("cpu", "memory", "io")
US = 1e-6


@dataclass
class PressureSnapshot:
    some_seconds: dict[str, float] = field(default_factory=dict)  # resource -> monotonic total
    full_seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def parse(text: str) -> dict[str, int]:
    """{"some": total_us, "full": total_us} from one pressure file; a damaged line is skipped."""
    out = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "total" and kind in ("some", "full") and DIGITS.fullmatch(value) and int(value) < 1 << 64:
                out[kind] = int(value)
    return out


class PressureSource:
    def __init__(self, procfs_root: str):
        self.directory = os.path.join(procfs_root, "pressure")
        self._counters = CounterSet()

    def sample(self) -> PressureSnapshot:
        snap = PressureSnapshot()
        for resource in RESOURCES:
            try:
                totals = parse(read_regular(os.path.join(self.directory, resource), PAGE).decode("ascii", "replace"))
            except FileNotFoundError:
                continue  # no PSI in this kernel, or not for this resource
            except NotRegularFile:
                snap.problems.append("not_regular_file")
                continue
            except OSError:
                snap.problems.append("read_error")  # EOPNOTSUPP when booted with psi=0
                continue
            if not totals:
                snap.problems.append("parse_error")
            for kind, target in (("some", snap.some_seconds), ("full", snap.full_seconds)):
                if kind in totals:
                    target[resource] = self._counters.update((resource, kind), totals[kind]) * US
        return snap
