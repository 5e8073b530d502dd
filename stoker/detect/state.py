"""The level learned for the running job, kept across agent restarts.

An agent restarted during an incident (an upgrade, a crash, a configuration
that needs a restart) would otherwise meet starved GPUs with no idea of their
normal, and could only call the incidents its evidence explains strongly. The
file holds the job's compute PIDs and its level; it is used again only for the
same PIDs (the same job, not a relaunch) and only within `baseline_window`
seconds of being written (PIDs are reused after a reboot, levels go stale).
Written atomically every `SAVE_EVERY` seconds while a level is known; any
error is logged and costs only this feature.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from stoker import logs

log = logs.get("state")

SAVE_EVERY = 30.0


class LevelStore:
    def __init__(self, path: str, max_age: float, wall: Callable[[], float] = time.time):
        self.path = path
        self.max_age = max_age
        self._wall = wall
        self.saved_at: float | None = None

    def load(self, pids: frozenset[int]) -> float | None:
        """The saved level of the job with exactly these PIDs, if saved recently."""
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read(65536))
            level, saved, saved_pids = float(data["level"]), float(data["saved"]), frozenset(data["pids"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("saved job level unreadable; learning it afresh", path=self.path, error=str(exc))
            return None
        if saved_pids != pids or not 0 <= self._wall() - saved <= self.max_age or not 0 < level <= 1:
            return None
        return level

    def due(self) -> bool:
        return self.saved_at is None or self._wall() - self.saved_at >= SAVE_EVERY

    def save(self, pids: frozenset[int], level: float) -> None:
        """Runs in a worker thread: a file write does not belong on the event loop."""
        self.saved_at = self._wall()
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump({"pids": sorted(pids), "level": level, "saved": self.saved_at}, fh)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save the job level", path=self.path, error=str(exc))
