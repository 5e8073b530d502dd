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
verdict changes; any error is logged and costs only this feature. The file is
a JSON object whose other fields belong to other parts of the agent (`inventory`:
stoker/exporters/inventory.py): each writer replaces its own fields and keeps
the rest (`write_fields`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from stoker import logs

log = logs.get("state")

SAVE_EVERY = 30.0
CARRY_FOR = 2 * SAVE_EVERY
"""A verdict saved this recently is carried over a restart (the file is rewritten at least every
`SAVE_EVERY` while a verdict holds): an older one may have ended while no agent watched."""


MAX_BYTES = 65536
_writing = threading.Lock()  # the writers of one process (worker threads) take turns


def read_fields(path: str) -> dict:
    """The file's fields; {} when it is missing. Raises OSError or ValueError when it is unreadable."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(MAX_BYTES))
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def write_fields(path: str, fields: dict) -> None:
    """Replace `fields` in the file, atomically, keeping the fields other writers own (an unreadable
    file is replaced). Raises OSError."""
    with _writing:
        try:
            data = read_fields(path)
        except (OSError, ValueError):
            data = {}
        data.update(fields)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)


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
        """What the previous run saved, if it saved it recently."""
        try:
            data = read_fields(self.path)
            if "saved" not in data:
                return None  # no job kept yet: a missing file, or others' fields only
            level, saved, saved_pids = data["level"], float(data["saved"]), frozenset(data["pids"])
            checkpoints = data.get("checkpoints", [])
            verdict = data.get("verdict") or {}
            cause, cold = verdict.get("cause"), bool(verdict.get("cold", False))
            came_back = bool(verdict.get("came_back", False))
            if level is not None:
                level = float(level)
            if not isinstance(checkpoints, list) or not all(isinstance(c, dict) for c in checkpoints):
                raise ValueError("checkpoints: not a list of records")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("saved job state unreadable; learning it afresh", path=self.path, error=str(exc))
            return None
        age = self._wall() - saved
        if not 0 <= age <= self.max_age:
            return None
        carried = cause if isinstance(cause, str) and age <= CARRY_FOR else None
        return Saved(saved_pids, level if level is not None and 0 < level <= 1 else None, checkpoints, carried,
                     cold and carried is not None, came_back and carried is not None)

    def due(self) -> bool:
        return self.saved_at is None or self._wall() - self.saved_at >= SAVE_EVERY

    def save(self, pids: frozenset[int], level: float | None, checkpoints: list[dict],
             verdict: tuple[str, bool, bool] | None = None) -> None:
        """Runs in a worker thread: a file write does not belong on the event loop."""
        self.saved_at = self._wall()
        if self.read_only:
            return
        try:
            write_fields(self.path, {
                "pids": sorted(pids), "level": level, "saved": self.saved_at, "checkpoints": checkpoints,
                "verdict": None if verdict is None else dict(zip(("cause", "cold", "came_back"), verdict))})
        except OSError as exc:
            log.warning("cannot save the job state", path=self.path, error=str(exc))
