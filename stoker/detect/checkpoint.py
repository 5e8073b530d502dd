"""Checkpoints per mount: opened by a hint from the job or detected from its writes.

Detected: on a mount of role `checkpoint`, a burst of writes
(`burst_bytes_per_second`, and `burst_factor` times the mount's usual rate),
whatever the GPUs do (an asynchronous checkpoint); or, whatever their
bandwidth, writes sustained for `detect_after` seconds above the usual rate
and `write_floor_bytes_per_second` while the GPUs wait (a slow checkpoint).
Writes are what the job hands to the client (`bytes:` normalwrite and
directwrite) as well as what reaches the server (serverwrite), so a checkpoint
whose bytes never leave the page cache is seen too.

Progress is bytes reaching the server, not bytes the job handed to the page
cache. A detected checkpoint ends when its writes end: no write for
`quiet_after` seconds and nothing left waiting for the server, whatever the
GPUs do next (resume, exit, or wait for another reason). A hinted one ends by
its hint. Stalled: no byte reached the server for `stall_after` seconds while
the checkpoint is open by a hint, or while written data waits for the server
(never one that simply finished). One nobody ends is closed after
`abandon_after`; one whose mount is gone for `stall_after` seconds is `lost`.

Outcomes: `completed`; `stalled` (it was stalled when it ended); `aborted`
(said by the job); `abandoned`; `lost`.

Each mount is a machine (`MountCheckpoints.state`):

| state | on | to |
| --- | --- | --- |
| `idle` | a burst; a start hint | `open` |
| `idle` | writes over the floor and the usual rate while the GPUs wait | `candidate` |
| `candidate` | that for `detect_after` | `open` (from the candidate's start) |
| `candidate` | a window without it | `idle` |
| `open` | no byte reached the server for `stall_after`, open by a hint or data waiting | `stalled` |
| `stalled` | a byte reaches the server | `open` |
| `open`, `stalled` | detected: quiet for `quiet_after`, nothing waiting; hinted: the end hint; `abandon_after`; the mount gone for `stall_after` | `settling` |
| `settling` | a quiet window, or the job handing over bytes of its own after the window of the end | `idle` |

`settling`: the page-cache flush that follows an end is the ended checkpoint's
bytes, not another one. At a job change (`job_changed`) a hinted checkpoint
is `abandoned` (its job was killed mid-save) and whatever the mount still
writes is *handed over*: it is the gone job's and explains no wait of the new
one, until the mount is quiet or the new job hands it bytes of its own.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from stoker import logs
from stoker.config import CheckpointConfig
from stoker.detect.evidence import Signal
from stoker.sources.nfs import NfsSample, NfsSnapshot

log = logs.get("checkpoint")

OUTCOMES = ("completed", "stalled", "aborted", "abandoned", "lost")
IDLE, CANDIDATE, OPEN, STALLED, SETTLING = "idle", "candidate", "open", "stalled", "settling"
STATES = (IDLE, CANDIDATE, OPEN, STALLED, SETTLING)
USUAL_RATES = 30
"""Windows of a mount's write rate outside checkpoints whose median is its usual rate (a median: the
first burst of a checkpoint into the page cache must not raise it)."""
UNFLUSHED_FLOOR = 1 << 20
"""Bytes written by the job and not yet on the server that still count as "flushed": page rounding,
and a thousandth of what was written (rewritten pages count twice on the client, once on the wire)."""
FORGET_AFTER = 600.0
"""A checkpoint mount gone this long (and no checkpoint open) is forgotten with its series."""


RECORD_FIELDS = ("started", "source", "start_server", "start_client", "last_server", "progress",
                 "expected_bytes", "stalled")
"""What of an open checkpoint the state file keeps: the rest is measured again from the next snapshot."""


class HintError(ValueError):
    """A hint that cannot be applied; the message is for the caller (HTTP 404/409; 503: not yet)."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


@dataclass
class Active:
    started: float  # wall clock
    source: str  # hint | detected
    start_server: float
    start_client: float
    last_server: float
    progress: float  # wall clock of the last byte that reached the server
    expected_bytes: float | None = None
    stalled: bool = False
    quiet_since: float | None = None
    writing: bool = True
    unflushed: float = 0.0  # bytes the job wrote that the server has not got yet


class _Handover:
    """Whether the job hands the page cache bytes of its own after an event (a checkpoint's end, another
    job taking the GPUs), counted from the first window after it: that window may still carry the bytes
    from before. Only the client's count tells: the server's also moves with a flush."""

    __slots__ = ("since",)

    def __init__(self) -> None:
        self.since: float | None = None

    def handed(self, s: NfsSample, floor: float) -> bool:
        if s.client_write_bytes is None:
            return False
        if self.since is None:
            self.since = s.client_write_bytes
        return s.client_write_bytes - self.since > floor


@dataclass
class MountCheckpoints:
    mountpoint: str
    state: str = IDLE
    active: Active | None = None  # open or stalled: the checkpoint
    written_bytes: float | None = None
    last_started: float | None = None
    last_progress: float | None = None
    last_duration: float | None = None
    outcomes: dict[str, int] = field(default_factory=lambda: {o: 0 for o in OUTCOMES})
    rates: deque[float] = field(default_factory=lambda: deque(maxlen=USUAL_RATES))
    server: float | None = None  # the mount's totals in the last distinct snapshot
    client: float | None = None
    quiet: tuple[float, float] | None = None  # totals when it last had no write: where a checkpoint starts
    candidate: float | None = None  # candidate: sustained writes while the GPUs wait, since when
    settling: _Handover | None = None  # settling: a checkpoint just ended, its last bytes may still be on their way
    inherited: _Handover | None = None  # handed over: what it writes now is a job's that is gone
    missing_since: float | None = None

    @property
    def usual_rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


class CheckpointTracker:
    def __init__(self, config: CheckpointConfig, wall: Callable[[], float] = time.time):
        self.config = config
        self._wall = wall
        self.mounts: dict[str, MountCheckpoints] = {}
        self._known: dict[str, NfsSample] = {}  # every NFS mount in the last snapshot
        self._snapshot: NfsSnapshot | None = None
        self._snapshot_at: float | None = None

    # -- hints ---------------------------------------------------------------------------

    def resolve(self, mountpoint: str | None, path: str | None) -> str:
        if (mountpoint or path) and self._snapshot is None:
            # no snapshot yet (the agent started less than a cycle ago): no mount is known, and none
            # is unknown either; "not an NFS mount" would send the job looking for a wrong path
            raise HintError("the agent has not read this node's NFS mounts yet (it has just started, or "
                            "[nfs] is off): send the hint again", status=503)
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
        if m.active is not None:
            m.active.source = "hint"  # the job confirms what was detected: keep its start
            m.active.expected_bytes = expected_bytes or m.active.expected_bytes
            return
        server = m.server or 0.0
        self._start(m, self._wall(), "hint", server, server if m.client is None else m.client, expected_bytes)

    def hint_end(self, mountpoint: str, outcome: str) -> None:
        m = self._mount(mountpoint)
        if m.active is None:
            raise HintError(f"no checkpoint in progress on {mountpoint}", status=409)
        self._end(m, self._wall(), "aborted" if outcome == "aborted" else None)

    def job_changed(self) -> None:
        """Another job holds the GPUs: a checkpoint the last one announced and never ended is over (it
        was killed mid-save); one detected from writes ends with its writes, whoever made them. Until
        the mount goes quiet or the new job hands it bytes of its own, what drains there is the last
        job's, and explains no wait of the new one (its loading is not a checkpoint)."""
        for m in self.mounts.values():
            if m.active is not None and m.active.source == "hint":
                log.warning("checkpoint abandoned: the job that announced it is gone", mountpoint=m.mountpoint)
                self._end(m, self._wall(), "abandoned")
            if m.state in (OPEN, STALLED, SETTLING):
                m.inherited = _Handover()

    def inherited(self, mountpoint: str) -> bool:
        """What this mount writes now is a job's that is gone."""
        m = self.mounts.get(mountpoint)
        return m is not None and m.inherited is not None

    # -- observation -------------------------------------------------------------------------

    def update(self, nfs: NfsSnapshot | None, gpus_waiting: bool) -> None:
        """Each verdict tick. Rates come from distinct NFS snapshots only; the clocks of stalls,
        abandonment and lost mounts run even while the NFS collector fails."""
        now = self._wall()
        fresh = nfs is not None and nfs is not self._snapshot
        dt = 0.0
        if fresh:
            dt = 0.0 if self._snapshot_at is None else max(0.0, now - self._snapshot_at)
            self._snapshot, self._snapshot_at = nfs, now
            self._known = {s.mountpoint: s for s in nfs.mounts}
            for s in nfs.mounts:
                if s.role == "checkpoint":
                    self._mount(s.mountpoint)
        for m in list(self.mounts.values()):
            sample = self._known.get(m.mountpoint) if self._snapshot is not None else None
            if sample is None or sample.write_bytes is None:
                self._missing(m, now)
            elif fresh:
                m.missing_since = None
                self._observe(m, sample, now, dt, gpus_waiting)
            if m.active is not None:
                self._check(m, now)

    def _observe(self, m: MountCheckpoints, s: NfsSample, now: float, dt: float, gpus_waiting: bool) -> None:
        server = s.write_bytes
        client = s.client_write_bytes if s.client_write_bytes is not None else server
        before_server, before_client = m.server, m.client
        m.server, m.client = server, client
        if before_server is None or dt <= 0:
            return
        server_rate = max(0.0, server - before_server) / dt
        client_rate = max(0.0, client - before_client) / dt
        c = self.config
        quiet = max(server_rate, client_rate) < c.write_floor_bytes_per_second
        if m.inherited is not None and (quiet or m.inherited.handed(s, c.write_floor_bytes_per_second)):
            m.inherited = None
        if m.active is None:
            if m.quiet is None or quiet or m.settling is not None:  # where the next checkpoint will have started
                m.quiet = (before_server, before_client)
            # the flush that follows a checkpoint's end is not another one; what the job hands over after the
            # window of the end is (a checkpoint after another while the NAS still drains the first)
            if m.state == SETTLING and (quiet or m.settling.handed(s, c.write_floor_bytes_per_second)):
                m.state, m.settling = IDLE, None
            if m.state != SETTLING:
                self._detect(m, now, dt, max(server_rate, client_rate), gpus_waiting)
            return
        a = m.active
        if server > a.last_server:
            a.last_server, a.progress = server, now
            if m.state == STALLED:
                m.state = OPEN
                a.stalled = False
                log.info("checkpoint resumed", mountpoint=m.mountpoint)
        written = server - a.start_server
        a.unflushed = max(0.0, (client - a.start_client) - written)
        a.writing = max(server_rate, client_rate) >= c.write_floor_bytes_per_second
        m.written_bytes, m.last_progress = written, a.progress
        if a.source == "detected":
            done = not a.writing and not _waiting_for_server(a)
            a.quiet_since = (a.quiet_since or now - dt) if done else None

    def _detect(self, m: MountCheckpoints, now: float, dt: float, rate: float, gpus_waiting: bool) -> None:
        """`rate`: the larger of what reaches the server and what the job hands to the page cache
        (a checkpoint stalled from its first byte only ever shows the latter)."""
        c = self.config
        floor = c.burst_factor * m.usual_rate
        if rate > max(c.burst_bytes_per_second, floor):
            self._start(m, now - dt, "detected", *m.quiet, None)
        elif rate > max(c.write_floor_bytes_per_second, floor) and gpus_waiting:
            if m.state != CANDIDATE:
                m.state, m.candidate = CANDIDATE, now - dt
            if now - m.candidate >= c.detect_after:
                self._start(m, m.candidate, "detected", *m.quiet, None)
        else:
            m.state, m.candidate = IDLE, None
            m.rates.append(rate)

    def _check(self, m: MountCheckpoints, now: float) -> None:
        """The clocks: a finished detected checkpoint ends, a silent one stalls, a forgotten one is closed."""
        a, c = m.active, self.config
        if a.quiet_since is not None and now - a.quiet_since >= c.quiet_after:
            self._end(m, a.quiet_since, None)
            return
        open_or_waiting = a.source == "hint" or _waiting_for_server(a) or a.writing
        if m.state == OPEN and open_or_waiting and now - a.progress > c.stall_after:
            m.state = STALLED
            a.stalled = True
            log.warning("checkpoint stalled", mountpoint=m.mountpoint, written_bytes=m.written_bytes,
                        waiting_bytes=a.unflushed, seconds_without_progress=round(now - a.progress, 1))
        if now - a.started > c.abandon_after:
            log.warning("checkpoint abandoned: nobody ended it", mountpoint=m.mountpoint)
            self._end(m, now, "abandoned")

    def _missing(self, m: MountCheckpoints, now: float) -> None:
        m.missing_since = m.missing_since or now
        m.server = m.client = None
        gone = now - m.missing_since
        if m.active is not None and gone > self.config.stall_after:
            log.warning("checkpoint lost: its mount is gone", mountpoint=m.mountpoint)
            self._end(m, m.missing_since, "lost")
        elif m.active is None and gone > FORGET_AFTER:
            del self.mounts[m.mountpoint]

    def _mount(self, mountpoint: str) -> MountCheckpoints:
        m = self.mounts.get(mountpoint)
        if m is None:
            m = self.mounts[mountpoint] = MountCheckpoints(mountpoint)
            sample = self._known.get(mountpoint)
            if sample is not None:
                m.server = sample.write_bytes
                m.client = sample.client_write_bytes if sample.client_write_bytes is not None else m.server
        return m

    def _start(self, m: MountCheckpoints, now: float, source: str, start_server: float, start_client: float,
               expected: float | None) -> None:
        m.state, m.candidate, m.settling = OPEN, None, None
        m.active = Active(now, source, start_server, start_client, m.server or start_server, now, expected)
        m.last_started, m.last_progress, m.written_bytes = now, now, 0.0
        log.info("checkpoint started", mountpoint=m.mountpoint, source=source, expected_bytes=expected)

    def _end(self, m: MountCheckpoints, now: float, outcome: str | None) -> None:
        a = m.active
        outcome = outcome or ("stalled" if a.stalled else "completed")
        m.outcomes[outcome] += 1
        m.last_duration = max(0.0, now - a.started)
        m.written_bytes = a.last_server - a.start_server
        m.state, m.active, m.settling, m.candidate = SETTLING, None, _Handover(), None
        log.info("checkpoint ended", mountpoint=m.mountpoint, outcome=outcome,
                 duration_seconds=round(m.last_duration, 1), written_bytes=m.written_bytes)

    # -- across agent restarts (detect/state.py) ------------------------------------------------

    def open_records(self) -> list[dict]:
        """The open checkpoints, as the state file keeps them."""
        return [{"mountpoint": mp, **{k: getattr(m.active, k) for k in RECORD_FIELDS}}
                for mp, m in self.mounts.items() if m.active is not None]

    def restore(self, records: list[dict]) -> list[str]:
        """Reopen the checkpoints a previous run of the agent had open, each only on the same mount as
        then: its counters not below what was saved (a remount starts them again from zero). Bytes that
        reached the server while no agent watched restart the stall clock (when they came is unknown) and
        make it end with its writes, as a detected one does (the job's end hint may have come while no
        agent listened); none did: the saved time of the last progress is exact. Replaces a checkpoint detected since the
        start (the same writes, seen from their middle). Returns the mountpoints reopened."""
        now, reopened = self._wall(), []
        for r in records:
            try:
                mp, source = str(r["mountpoint"]), r["source"]
                started, start_server, start_client, last_server, progress = (
                    float(r[k]) for k in ("started", "start_server", "start_client", "last_server", "progress"))
                expected = None if r["expected_bytes"] is None else float(r["expected_bytes"])
                stalled = bool(r["stalled"])
            except (KeyError, TypeError, ValueError):
                continue
            sample = self._known.get(mp)
            if source not in ("hint", "detected") or sample is None or sample.write_bytes is None \
                    or sample.write_bytes < last_server:
                continue
            m = self._mount(mp)
            a = Active(started, source, start_server, start_client, last_server, progress, expected, stalled)
            if sample.write_bytes > last_server:  # its end hint, if any, may have gone to no agent:
                a.last_server, a.progress, a.stalled = sample.write_bytes, now, False  # it ends with its writes
                a.source = "detected"
            m.state, m.active, m.candidate, m.settling = STALLED if a.stalled else OPEN, a, None, None
            m.last_started, m.last_progress, m.written_bytes = started, a.progress, a.last_server - start_server
            reopened.append(mp)
        return reopened

    # -- what the verdicts read ---------------------------------------------------------------

    def signals(self) -> list[Signal]:
        """Checkpoints that explain a wait: open by a hint, writing, or with data waiting for the server."""
        now, out = self._wall(), []
        for m in self.mounts.values():
            a = m.active
            explains = a is not None and (a.source == "hint" or a.writing or _waiting_for_server(a) or a.stalled)
            if not explains or m.inherited:
                continue
            state = (f"stalled: no byte reached the NAS for {now - a.progress:.0f} s" if a.stalled
                     else f"{(m.written_bytes or 0) / 1e9:.2f} GB written in {now - a.started:.0f} s")
            out.append(Signal("checkpoint", m.mountpoint, 1.0, f"checkpoint on {m.mountpoint} ({a.source}): {state}"))
        return out

    def over_budget(self, m: MountCheckpoints) -> bool:
        return m.active is not None and self._wall() - m.active.started > self.config.budget


def _waiting_for_server(a: Active) -> bool:
    """Data the job wrote is still on its way to the server."""
    return a.unflushed > max(UNFLUSHED_FLOOR, 0.001 * (a.last_server - a.start_server))
