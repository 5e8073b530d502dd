"""NFS mounts as typed samples: mountstats parsed, counters made monotonic, roles assigned.

Several NFS mounts can sit on one mountpoint (a mount over a mount, autofs).
Only the topmost is reported: the last one listed for that mountpoint, the one
processes reach through the path. Reporting each would give Prometheus two
series with the same labels, and it rejects the whole scrape for that. The
counters of a mountpoint follow one mount, identified by its export and how
many mounts lie under it: when another mount becomes the visible one (stacked
on top, or uncovered by an unmount), the counters start from its values as a
new baseline and the totals go on from where they were. Mixing two mounts'
values in one counter read each switch as a reset or a huge rise (5e12 B/s
measured), and keying totals by mount would make the series jump to another
mount's total when it is uncovered.

A mountpoint gone for `counters.FORGET_AFTER` has its counter state dropped:
a node that churns mounts keeps bounded memory. Until then a remount carries on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from stoker.counters import CounterSet, Presence
from stoker.sources.files import read_regular
from stoker.sources.mountstats import NfsMount, parse

MS = 1e-3
MOUNTSTATS_LIMIT = 32 << 20
"""Bytes of mountstats read: an NFSv4.1 mount takes about 8 KB (60 operations, a line per transport),
so a few thousand mounts; past it, the mounts at the end are not seen (counted as `too_large`)."""


@dataclass
class NfsSample:
    mountpoint: str
    export: str
    version: str
    protocol: str
    nconnect: int
    role: str
    read_bytes: float | None = None
    write_bytes: float | None = None
    client_write_bytes: float | None = None  # handed to the client by applications; minus write_bytes: not yet on the server
    ops: dict[str, dict[str, float]] = field(default_factory=dict)  # operation -> field -> monotonic total


@dataclass
class NfsSnapshot:
    mounts: list[NfsSample]
    problems: list[str] = field(default_factory=list)


def role_of(mountpoint: str, roles: dict[str, tuple[str, ...]]) -> str:
    """The role whose prefix matches the mountpoint at the longest path boundary; `other` when none does."""
    best, best_len = "other", -1
    for role, prefixes in roles.items():
        for prefix in prefixes:
            p = prefix.rstrip("/") or "/"
            if (mountpoint == p or mountpoint.startswith(p + "/") or p == "/") and len(p) > best_len:
                best, best_len = role, len(p)
    return best


def topmost(mounts: list[NfsMount]) -> list[tuple[NfsMount, tuple[str, int]]]:
    """The last mount listed on each mountpoint, with its identity: (export, mounts under it)."""
    top: dict[str, tuple[NfsMount, tuple[str, int]]] = {}
    for m in mounts:
        under = top[m.mountpoint][1][1] + 1 if m.mountpoint in top else 0
        top[m.mountpoint] = (m, (m.export, under))
    return list(top.values())


class NfsSource:
    def __init__(self, procfs_root: str, operations: tuple[str, ...], roles: dict[str, tuple[str, ...]],
                 clock: Callable[[], float] = time.monotonic):
        self.path = os.path.join(procfs_root, "self", "mountstats")
        self.operations = frozenset(operations)
        self.roles = roles
        self._clock = clock
        self._counters = CounterSet()  # keyed (mountpoint, ...)
        self._identity: dict[str, tuple[str, int]] = {}  # mountpoint -> the mount its counters follow
        self._ops: dict[str, dict[str, tuple[dict, dict]]] = {}  # mountpoint -> op -> (raw values, totals)
        self._present = Presence()

    def read_text(self) -> str:
        """Many pages with many mounts, up to `MOUNTSTATS_LIMIT`; names as the kernel wrote them (UTF-8,
        any other byte kept as a surrogate escape: mountstats.label_text)."""
        return read_regular(self.path, MOUNTSTATS_LIMIT).decode("utf-8", "surrogateescape")

    def sample(self) -> NfsSnapshot:
        try:
            text = self.read_text()
        except FileNotFoundError:
            return NfsSnapshot([])  # no procfs mountstats: nothing mounted to report
        mounts, problems = parse(text, self.operations)
        if len(text) >= MOUNTSTATS_LIMIT:
            problems.append("too_large")  # the mounts past the cap are not seen
        now = self._clock()
        visible = topmost(mounts)
        samples = [self._sample(m, identity, now) for m, identity in visible]
        problems += ["implausible_value"] * sum(1 for m, _ in visible if m.dropped_fields)
        gone = self._present.gone(now)
        self._counters.forget(gone)
        for mountpoint in gone:
            del self._identity[mountpoint]
            self._ops.pop(mountpoint, None)
        return NfsSnapshot(samples, problems)

    def _sample(self, m: NfsMount, identity: tuple[str, int], now: float) -> NfsSample:
        s = NfsSample(m.mountpoint, m.export, m.version or ("4" if m.fstype == "nfs4" else ""),
                      m.protocol, m.nconnect, role_of(m.mountpoint, self.roles))
        key = m.mountpoint
        self._present.seen(key, now)
        if self._identity.setdefault(key, identity) != identity:
            self._counters.rebase(key)  # another mount is now the visible one: no jump in the totals
            self._identity[key] = identity
            self._ops.pop(key, None)
        if m.server_read_bytes is not None:
            s.read_bytes = self._counters.update((key, "read_bytes"), m.server_read_bytes)
        if m.server_write_bytes is not None:
            s.write_bytes = self._counters.update((key, "write_bytes"), m.server_write_bytes)
        if m.client_write_bytes is not None:
            s.client_write_bytes = self._counters.update((key, "client_write_bytes"), m.client_write_bytes)
        last = self._ops.setdefault(key, {})
        for op, values in m.ops.items():
            seen = last.get(op)
            if seen is not None and seen[0] == values:  # an idle operation: its totals stand
                s.ops[op] = seen[1]  # a totals dict is never changed once made: samples share it
                continue
            totals = {f: self._counters.update((key, op, f), v) for f, v in values.items()}
            last[op] = (values, totals)
            s.ops[op] = totals
        return s
