"""Reading kernel files (sysfs, procfs) tolerantly.

`FileReader` is the file-system boundary: tests replace `read` to inject
EINVAL or EACCES (as root, chmod cannot make a sysfs file fail). `Backoff`
keeps a failing file from being read every cycle: some firmware queries
behind sysfs counters log a kernel warning on each failed read.

Every sysfs attribute and procfs statistics file is a regular file. Anything
else in its place (a FIFO, a device node, a directory) is refused before it is
read: opening a FIFO for reading blocks until a writer comes, and a character
device can stream forever. The open itself is non-blocking for that reason.
"""

from __future__ import annotations

import errno
import os
import re
import stat


class BadValue(ValueError):
    """A file that was read but holds no usable number (garbage, `N/A (no PMA)`)."""

    def __init__(self, reason: str, text: str):
        super().__init__(f"{reason}: {text[:60]!r}")
        self.reason = reason


class NotRegularFile(OSError):
    """A FIFO, device node or directory where the kernel puts a regular file."""

    reason = "not_regular_file"


def read_regular(path: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file (at most `limit`), never blocking on what is not one."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"not a regular file: {path}")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
            return fh.read(limit) if limit is not None else fh.read()
    finally:
        os.close(fd)


class FileReader:
    def read(self, path: str) -> str:
        return read_regular(path, 4096).decode("ascii", "replace")

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))


def error_reason(exc: BaseException) -> str:
    """A short label for `stoker_collector_errors_total{reason}`."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return reason
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}").lower()
    return type(exc).__name__.lower()


DIGITS = re.compile(r"[0-9]{1,20}")  # a u64 in decimal: what sysfs prints for a counter
IMPLAUSIBLE = 1 << 63  # half the u64 range: a negative number printed unsigned, or all ones


def parse_counter(text: str) -> int:
    """A counter file's value. Beyond u64 it is garbage (a float of it would overflow);
    from 2^63 it is implausible: 2^63 four-byte words take 23 years at 400 Gb/s."""
    value = text.strip()
    if value.startswith("N/A"):
        raise BadValue("no_pma", value)
    if not DIGITS.fullmatch(value) or (number := int(value)) >= 1 << 64:
        raise BadValue("garbage", value)
    if number >= IMPLAUSIBLE:
        raise BadValue("implausible_value", value)
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

    def forget(self, prefix: str) -> None:
        """Drop the schedules of keys under `prefix` (a port that is gone): memory stays bounded."""
        for key in [k for k in self._state if k.startswith(prefix)]:
            del self._state[key]
