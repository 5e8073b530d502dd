"""What the verdicts learned about the running job, kept across agent restarts.

An agent restarted during an incident (an upgrade, a crash, a configuration
that needs a restart) would otherwise meet starved GPUs with no idea of their
normal, and a checkpoint that stalled before the restart with no idea that
one was open: once the page cache is full and the NAS takes no byte, nothing
on the node moves that would show a checkpoint afresh. The file holds the
job's compute PIDs, its level, its open checkpoints and the verdict; they are used again
only for the same job (most of its PIDs the saved ones, not a relaunch) and only within
`max_age` seconds of being written (PIDs are reused after a reboot, levels go
stale; a verdict within `CARRY_FOR`, so that the restart does not read as a
recovery). Written atomically every `SAVE_EVERY` seconds while there is
something to keep, and at once when a checkpoint opens, stalls or ends or the
verdict changes; any error is logged and costs only this feature.

The file is input like any other (a disk error, an old release, a hand edit, a
file planted by another user of the directory). It is read only if it is a
regular file and not a symbolic link, opened without blocking (a FIFO there
blocked the start for good), at most `MAX_BYTES`. Every field is checked: a
damaged file as a whole is "unreadable", one line; a damaged part (the level,
the verdict, one checkpoint record) is left out with one line naming it, and
the rest is used. No NaN or infinity is ever restored, nor written. A save
writes a new file of its own (O_EXCL|O_NOFOLLOW: a link planted at the
temporary name is never followed), flushes it to disk and renames it over the
state file, and only if that is a regular file or absent.

The file is a JSON object whose other fields belong to other parts of the agent
(`inventory`: stoker/exporters/inventory.py): each writer replaces its own
fields and keeps the rest (`write_fields`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable

from stoker import logs
from stoker.detect.policy import CAUSE_NAMES as CAUSES
from stoker.sources.files import NotRegularFile, read_regular
from stoker.sources.jobs import PID_MAX_LIMIT

log = logs.get("state")

SAVE_EVERY = 30.0
CARRY_FOR = 2 * SAVE_EVERY
"""A verdict saved this recently is carried over a restart (the file is rewritten at least every
`SAVE_EVERY` while a verdict holds): an older one may have ended while no agent watched."""
MAX_BYTES = 65536
"""A job's PIDs, level, verdict and open checkpoints take a few hundred bytes."""
CHECKPOINT_NUMBERS = ("started", "start_server", "start_client", "last_server", "progress", "expected_bytes")
"""The numbers of a checkpoint record (detect/checkpoint.py RECORD_FIELDS): wall-clock times and byte counts."""
TEMPORARY = r"\.[0-9a-f]{16}\.tmp"
"""What a save's temporary file adds to the state file's name."""


class Unreadable(ValueError):
    """The file as a whole cannot be used: the message says why."""


_writing = threading.Lock()  # the writers of one process (worker threads) take turns


def read_fields(path: str) -> dict:
    """The file's fields; {} when it is missing. Raises OSError or Unreadable (a ValueError)."""
    try:
        return _read(path)
    except FileNotFoundError:
        return {}


def write_fields(path: str, fields: dict) -> None:
    """Replace `fields` in the file, atomically, keeping the fields other writers own (an unreadable
    file is replaced). Raises OSError, or ValueError for a value JSON cannot hold (NaN)."""
    with _writing:
        try:
            data = read_fields(path)
        except (OSError, ValueError):
            data = {}
        data.update(fields)
        _write(path, json.dumps(data, allow_nan=False).encode())


@dataclass(frozen=True)
class Saved:
    pids: frozenset[int]
    level: float | None
    checkpoints: list[dict]  # CheckpointTracker.open_records() of the last run
    cause: str | None = None  # the verdict when saved, if saved less than CARRY_FOR ago
    cold: bool = False  # that verdict was reached before the job's level was known
    came_back: bool = False  # that verdict was an intermittent fault's return: its recovery is damped


class StateStore:
    def __init__(self, path: str, max_age: float, wall: Callable[[], float] = time.time, read_only: bool = False):
        """`read_only`: `stoker check` reads the service's file and must not replace it."""
        self.path = path
        self.max_age = max_age
        self._wall = wall
        self.saved_at: float | None = None
        self.read_only = read_only

    def load(self) -> Saved | None:
        """What the previous run saved, if it saved it recently. A writer also removes the temporary
        files of saves that a kill cut short."""
        if not self.read_only:
            self._remove_leftovers()
        try:
            data = _read(self.path)
            if "saved" not in data:
                return None  # no job kept yet: others' fields only
            saved, pids = _saved_at(data.get("saved")), _pids(data.get("pids"))
            checkpoints = data.get("checkpoints", [])
            if not isinstance(checkpoints, list):
                raise Unreadable("checkpoints: not a list of records")
        except FileNotFoundError:
            return None
        except (OSError, Unreadable) as exc:
            log.warning("saved job state unreadable; learning it afresh", path=self.path, error=_reason(exc))
            return None
        age = self._wall() - saved
        if not 0 <= age <= self.max_age:
            log.info("saved job state not used", path=self.path,
                     reason="saved in the future" if age < 0 else f"older than {self.max_age:g} s")
            return None
        level = self._part("level", data.get("level"), _level)
        verdict = self._part("verdict", data.get("verdict"), _verdict) or (None, False, False)
        kept = [r for i, r in enumerate(checkpoints) if self._part(f"checkpoints[{i}]", r, _checkpoint) is not None]
        cause, cold, came_back = verdict if age <= CARRY_FOR else (None, False, False)
        return Saved(pids, level, kept, cause, cold and cause is not None, came_back and cause is not None)

    def _part(self, name: str, value, check: Callable):
        """`check(value)`, or None with one line saying what was wrong with that part."""
        try:
            return check(value)
        except Unreadable as exc:
            log.warning("part of the saved job state left out", path=self.path, part=name, error=str(exc))
            return None

    def due(self) -> bool:
        return self.saved_at is None or self._wall() - self.saved_at >= SAVE_EVERY

    def save(self, pids: frozenset[int], level: float | None, checkpoints: list[dict],
             verdict: tuple[str, bool, bool] | None = None) -> None:
        """Runs in a worker thread: a file write does not belong on the event loop. What the next load
        would leave out is not written (a NaN level, a record holding one)."""
        self.saved_at = self._wall()
        if self.read_only:
            return
        level = _or_none(_level, level)
        checkpoints = [r for r in checkpoints if _or_none(_checkpoint, r) is not None]
        record = {"pids": sorted(pids), "level": level, "saved": self.saved_at, "checkpoints": checkpoints,
                  "verdict": None if verdict is None else dict(zip(("cause", "cold", "came_back"), verdict))}
        try:
            write_fields(self.path, record)
        except (OSError, ValueError) as exc:
            log.warning("cannot save the job state", path=self.path, error=_reason(exc))

    def _remove_leftovers(self) -> None:
        directory, name = os.path.split(self.path)
        pattern = re.compile(re.escape(name) + TEMPORARY)
        try:
            names = [n for n in os.listdir(directory or ".") if pattern.fullmatch(n)]
        except (OSError, ValueError):
            return
        for n in names:
            path = os.path.join(directory, n)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass


def _read(path: str) -> dict:
    try:
        raw = read_regular(path, MAX_BYTES + 1, follow=False)
    except NotRegularFile:
        raise Unreadable("not a regular file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unreadable("a symbolic link (not followed)") from None
        raise
    except ValueError:  # a NUL in the path
        raise Unreadable("the path holds a NUL byte") from None
    if len(raw) > MAX_BYTES:
        raise Unreadable(f"larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise Unreadable("nested too deeply") from None
    except ValueError as exc:  # not UTF-8, not JSON, an integer of more than 4300 digits
        raise Unreadable(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Unreadable(f"not a JSON object but {type(data).__name__}")
    return data


def _write(path: str, data: bytes) -> None:
    """`data` in a new file of its own, flushed to disk, renamed over `path`."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise NotRegularFile("the state file is not a regular file; left as it is")
    except FileNotFoundError:
        pass
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _reason(exc: Exception) -> str:
    return (isinstance(exc, OSError) and exc.strerror) or str(exc)


def _number(value, what: str) -> float:
    """A finite number from JSON (not a bool), or Unreadable."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unreadable(f"{what}: not a number: {value!r:.40}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise Unreadable(f"{what}: not a finite number: {value!r:.40}")
    return number


def _saved_at(value) -> float:
    saved = _number(value, "saved")
    if saved < 0:
        raise Unreadable(f"saved: before 1970: {value!r}")
    return saved


def _pids(value) -> frozenset[int]:
    if not isinstance(value, list) or not all(type(p) is int and 0 < p <= PID_MAX_LIMIT for p in value):
        raise Unreadable(f"pids: not a list of PIDs (1 to {PID_MAX_LIMIT})")
    return frozenset(value)


def _level(value) -> float | None:
    if value is None:
        return None
    level = _number(value, "level")
    if not 0 < level <= 1:
        raise Unreadable(f"level: not a share of the GPUs' time (0 to 1): {value!r}")
    return level


def _verdict(value) -> tuple[str | None, bool, bool]:
    if value is None:
        return None, False, False
    if not isinstance(value, dict):
        raise Unreadable(f"not an object but {type(value).__name__}")
    cause, cold, came_back = value.get("cause"), value.get("cold", False), value.get("came_back", False)
    if cause is not None and cause not in CAUSES:
        raise Unreadable(f"cause: not one of {', '.join(CAUSES)}: {cause!r:.40}")
    if not isinstance(cold, bool) or not isinstance(came_back, bool):
        raise Unreadable("cold, came_back: not true or false")
    return cause, cold, came_back


def _checkpoint(record) -> dict:
    """A checkpoint record whose fields, those present, have their types (a missing one makes
    CheckpointTracker.restore skip the record)."""
    if not isinstance(record, dict):
        raise Unreadable(f"not an object but {type(record).__name__}")
    mountpoint = record.get("mountpoint")
    if not isinstance(mountpoint, str) or not mountpoint.startswith("/") or not _text(mountpoint):
        raise Unreadable(f"mountpoint: not an absolute path: {mountpoint!r:.60}")
    if "source" in record and record["source"] not in ("hint", "detected"):
        raise Unreadable(f"source: not hint or detected: {record['source']!r:.40}")
    for key in CHECKPOINT_NUMBERS:
        value = record.get(key)
        if key in record and not (key == "expected_bytes" and value is None) and _number(value, key) < 0:
            raise Unreadable(f"{key}: negative: {value!r}")
    if "stalled" in record and not isinstance(record["stalled"], bool):
        raise Unreadable("stalled: not true or false")
    return record


def _text(value: str) -> bool:
    """Valid UTF-8 without NUL (JSON may hold a lone surrogate, which no label can)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in value


def _or_none(check: Callable, value):
    try:
        return check(value)
    except Unreadable:
        return None
