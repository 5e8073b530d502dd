"""Checkpoints per mount: started by a hint from the job or detected from a write burst.

Progress is bytes reaching the server (mountstats `bytes:` serverwrite), not
bytes the job handed to the page cache. A checkpoint is stalled while in
progress with no such byte for `stall_after` seconds, over budget past
`budget`. It ends by a hint (`completed` or `aborted`), or, when detected,
once writes have been quiet for `quiet_after` and the GPUs work again; one
nobody ends is closed after `abandon_after`. It ends `stalled` if it was
stalled when it ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from stoker import logs
from stoker.config import CheckpointConfig
from stoker.sources.nfs import NfsSnapshot

log = logs.get("checkpoint")

OUTCOMES = ("completed", "stalled", "aborted")
IDLE_RATE_WEIGHT = 0.1


class HintError(ValueError):
    """A hint that cannot be applied; the message is for the caller (HTTP 404/409)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


@dataclass
class Active:
    started: float  # wall clock
    source: str  # hint | detected
    start_bytes: float
    last_bytes: float
    progress: float  # wall clock of the last byte that reached the server
    expected_bytes: float | None = None
    stalled: bool = False
    quiet_since: float | None = None


@dataclass
class MountCheckpoints:
    mountpoint: str
    role: str = "checkpoint"
    active: Active | None = None
    written_bytes: float | None = None
    last_started: float | None = None
    last_progress: float | None = None
    last_duration: float | None = None
    outcomes: dict[str, int] = field(default_factory=lambda: {o: 0 for o in OUTCOMES})
    idle_write_rate: float = 0.0
    write_bytes: float | None = None  # the mount's serverwrite total at the last update


class CheckpointTracker:
    def __init__(self, config: CheckpointConfig, wall: Callable[[], float] = time.time):
        self.config = config
        self._wall = wall
        self.mounts: dict[str, MountCheckpoints] = {}
        self._known: dict[str, float | None] = {}  # every NFS mountpoint -> its write bytes

    # -- hints ---------------------------------------------------------------------------

    def resolve(self, mountpoint: str | None, path: str | None) -> str:
        if mountpoint:
            if mountpoint not in self._known:
                raise HintError(f"{mountpoint} is not an NFS mount of this node")
            return mountpoint
        if path:
            candidates = [m for m in self._known if path == m or path.startswith(m.rstrip("/") + "/")]
            if candidates:
                return max(candidates, key=len)
            raise HintError(f"{path} is not on an NFS mount of this node")
        raise HintError("give `mountpoint` or `path`", status=400)

    def hint_start(self, mountpoint: str, expected_bytes: float | None = None) -> None:
        m = self._mount(mountpoint)
        now = self._wall()
        if m.active is not None:
            m.active.source = "hint"  # the job confirms what was detected: keep its start
            m.active.expected_bytes = expected_bytes or m.active.expected_bytes
            return
        written = self._known.get(mountpoint) or 0.0
        self._start(m, now, "hint", written, expected_bytes)

    def hint_end(self, mountpoint: str, outcome: str) -> None:
        m = self._mount(mountpoint)
        if m.active is None:
            raise HintError(f"no checkpoint in progress on {mountpoint}", status=409)
        self._end(m, self._wall(), "aborted" if outcome == "aborted" else None)

    # -- observation -------------------------------------------------------------------------

    def update(self, nfs: NfsSnapshot | None, dt: float, gpus_working: bool) -> None:
        if nfs is None:
            return
        now = self._wall()
        self._known = {m.mountpoint: m.write_bytes for m in nfs.mounts}
        for sample in nfs.mounts:
            if sample.role == "checkpoint":
                self._mount(sample.mountpoint)
        for m in self.mounts.values():
            written = self._known.get(m.mountpoint)
            if written is None:
                continue
            rate = 0.0 if m.write_bytes is None or dt <= 0 else max(0.0, written - m.write_bytes) / dt
            before, m.write_bytes = m.write_bytes, written
            if m.active is None:
                if before is not None and rate > max(self.config.burst_bytes_per_second,
                                                     self.config.burst_factor * m.idle_write_rate):
                    self._start(m, now - dt, "detected", before, None)
                else:
                    m.idle_write_rate += IDLE_RATE_WEIGHT * (rate - m.idle_write_rate)
                    continue
            self._observe(m, now, written, rate, gpus_working)

    def _observe(self, m: MountCheckpoints, now: float, written: float, rate: float, gpus_working: bool) -> None:
        a = m.active
        if written > a.last_bytes:
            a.last_bytes, a.progress = written, now
            if a.stalled:
                a.stalled = False
                log.info("checkpoint resumed", mountpoint=m.mountpoint)
        m.written_bytes = a.last_bytes - a.start_bytes
        m.last_progress = a.progress
        finishing = False
        if a.source == "detected":
            quiet = rate < self.config.burst_bytes_per_second
            a.quiet_since = (a.quiet_since or now) if quiet else None
            finishing = quiet and gpus_working  # writes done, training resumed: not a stall
            if finishing and now - a.quiet_since >= self.config.quiet_after:
                self._end(m, a.quiet_since, None)
                return
        if not a.stalled and not finishing and now - a.progress > self.config.stall_after:
            a.stalled = True
            log.warning("checkpoint stalled", mountpoint=m.mountpoint, written_bytes=m.written_bytes,
                        seconds_without_progress=round(now - a.progress, 1))
        if now - a.started > self.config.abandon_after:
            log.warning("checkpoint abandoned: nobody ended it", mountpoint=m.mountpoint)
            self._end(m, now, "aborted")

    def _mount(self, mountpoint: str) -> MountCheckpoints:
        m = self.mounts.get(mountpoint)
        if m is None:
            m = self.mounts[mountpoint] = MountCheckpoints(mountpoint)
            m.write_bytes = self._known.get(mountpoint)
        return m

    def _start(self, m: MountCheckpoints, now: float, source: str, start_bytes: float,
               expected: float | None) -> None:
        m.active = Active(now, source, start_bytes, start_bytes, now, expected)
        m.last_started, m.last_progress, m.written_bytes = now, now, 0.0
        log.info("checkpoint started", mountpoint=m.mountpoint, source=source, expected_bytes=expected)

    def _end(self, m: MountCheckpoints, now: float, outcome: str | None) -> None:
        a = m.active
        outcome = outcome or ("stalled" if a.stalled else "completed")
        m.outcomes[outcome] += 1
        m.last_duration = max(0.0, now - a.started)
        m.written_bytes = a.last_bytes - a.start_bytes
        m.active = None
        log.info("checkpoint ended", mountpoint=m.mountpoint, outcome=outcome,
                 duration_seconds=round(m.last_duration, 1), written_bytes=m.written_bytes)

    def any_active(self) -> bool:
        return any(m.active is not None for m in self.mounts.values())

    def over_budget(self, m: MountCheckpoints) -> bool:
        return m.active is not None and self._wall() - m.active.started > self.config.budget
