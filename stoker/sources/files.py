"""Reading kernel files (sysfs, procfs) tolerantly.

`FileReader` is the file-system boundary: tests replace `read` to inject
EINVAL or EACCES (as root, chmod cannot make a sysfs file fail). `Backoff`
keeps a failing file from being read every cycle: some firmware queries
behind sysfs counters log a kernel warning on each failed read.
"""

from __future__ import annotations

import errno
import os


class BadValue(ValueError):
    """A file that was read but holds no usable number (garbage, `N/A (no PMA)`)."""

    def __init__(self, reason: str, text: str):
        super().__init__(f"{reason}: {text[:60]!r}")
        self.reason = reason


class FileReader:
    def read(self, path: str) -> str:
        with open(path, "rb", buffering=0) as fh:
            return fh.read(4096).decode("ascii", "replace")

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))


def error_reason(exc: BaseException) -> str:
    """A short label for `stoker_collector_errors_total{reason}`."""
    if isinstance(exc, BadValue):
        return exc.reason
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}").lower()
    return type(exc).__name__.lower()


def parse_counter(text: str) -> int:
    value = text.strip()
    if value.startswith("N/A"):
        raise BadValue("no_pma", value)
    try:
        number = int(value, 10)
    except ValueError:
        raise BadValue("garbage", value) from None
    if number < 0:
        raise BadValue("garbage", value)
    return number


class Backoff:
    """Per-key retry schedule: 1 cycle, then 2, 4, ... up to `cap` seconds."""

    def __init__(self, first: float = 1.0, cap: float = 300.0):
        self._first, self._cap = first, cap
        self._state: dict[str, tuple[float, float]] = {}  # key -> (retry at, next delay)

    def ready(self, key: str, now: float) -> bool:
        state = self._state.get(key)
        return state is None or now >= state[0]

    def failed(self, key: str, now: float) -> None:
        delay = self._state.get(key, (0.0, self._first))[1]
        self._state[key] = (now + delay, min(delay * 2, self._cap))

    def succeeded(self, key: str) -> None:
        self._state.pop(key, None)
