"""NFS mounts as typed samples: mountstats parsed, counters made monotonic, roles assigned."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stoker.counters import CounterSet
from stoker.sources.mountstats import NfsMount, parse

MS = 1e-3


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


class NfsSource:
    def __init__(self, procfs_root: str, operations: tuple[str, ...], roles: dict[str, tuple[str, ...]]):
        self.path = os.path.join(procfs_root, "self", "mountstats")
        self.operations = frozenset(operations)
        self.roles = roles
        self._counters = CounterSet()

    def read_text(self) -> str:
        with open(self.path, "rb") as fh:  # can exceed one page with many mounts
            return fh.read().decode("ascii", "replace")

    def sample(self) -> NfsSnapshot:
        try:
            text = self.read_text()
        except FileNotFoundError:
            return NfsSnapshot([])  # no procfs mountstats: nothing mounted to report
        mounts, problems = parse(text)
        samples = [self._sample(m) for m in mounts]
        problems += ["implausible_value"] * sum(1 for m in mounts if m.dropped_fields)
        return NfsSnapshot(samples, problems)

    def _sample(self, m: NfsMount) -> NfsSample:
        s = NfsSample(m.mountpoint, m.export, m.version or ("4" if m.fstype == "nfs4" else ""),
                      m.protocol, m.nconnect, role_of(m.mountpoint, self.roles))
        key = m.mountpoint
        if m.server_read_bytes is not None:
            s.read_bytes = self._counters.update((key, "read_bytes"), m.server_read_bytes)
        if m.server_write_bytes is not None:
            s.write_bytes = self._counters.update((key, "write_bytes"), m.server_write_bytes)
        if m.client_write_bytes is not None:
            s.client_write_bytes = self._counters.update((key, "client_write_bytes"), m.client_write_bytes)
        for op, values in m.ops.items():
            if op not in self.operations:
                continue
            s.ops[op] = {f: self._counters.update((key, op, f), v) for f, v in values.items()}
        return s
