"""Writing the simulated kernel's files the way the kernel shows them: in place, cheaply.

The kernel's sysfs and procfs files are generated when read: a reader never sees
one missing, empty or half written, and its inode never changes while the
device lives. The simulated ones are regular files, so `KernelFiles` writes
each one in place through a descriptor kept open: one `pwrite` of the whole
text at offset 0, and only when the text changed. Counters only grow, so the
new text is seldom shorter; when it is, it is first written padded with
newlines to the old length and then truncated, so a reader sees the old text,
the new one, or the new one followed by blank lines (which every parser of
these files strips), never an empty file. open(O_TRUNC) and write, as before,
cost about 200 us a file on ext4 and showed readers an empty file in between.

The same inodes for the life of the simulation is also what a reader that
keeps its files open (`stoker.sources.files.KeptFiles`) needs to see every
change. At most an eighth of the soft descriptor limit is kept open per
process (several simulated nodes share one in the fleet benchmark); past it a
file is opened for each write.
"""

from __future__ import annotations

import os
import resource
import threading

KEPT_MAX = 4096
_budget = {"kept": 0, "limit": None}
_budget_lock = threading.Lock()


def _reserve() -> bool:
    with _budget_lock:
        if _budget["limit"] is None or _budget["kept"] >= _budget["limit"]:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            _budget["limit"] = KEPT_MAX if soft == resource.RLIM_INFINITY else min(KEPT_MAX, soft // 8)
        if _budget["kept"] >= _budget["limit"]:
            return False
        _budget["kept"] += 1
        return True


def _release(n: int) -> None:
    with _budget_lock:
        _budget["kept"] -= n


class KernelFiles:
    def __init__(self) -> None:
        self._fds: dict[str, int] = {}  # path -> descriptor kept open
        self._texts: dict[str, bytes] = {}  # path -> what it holds

    def put(self, path: str, text: str) -> bool:
        """Make the file at `path` hold `text`; False when it already did (nothing written)."""
        data = text.encode()
        old = self._texts.get(path)
        if old == data:
            return False
        fd = self._fds.get(path)
        kept = fd is not None
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if old is None:
                old_size = os.fstat(fd).st_size
                old = b"\n" * old_size if old_size > len(data) else b""
            if _reserve():
                self._fds[path] = fd
                kept = True
        try:
            if len(data) < len(old):
                os.pwrite(fd, data + b"\n" * (len(old) - len(data)), 0)
                os.ftruncate(fd, len(data))
            else:
                os.pwrite(fd, data, 0)
        finally:
            if not kept:
                os.close(fd)
        self._texts[path] = data
        return True

    def forget(self, path: str) -> None:
        """The file was removed or replaced by someone else: open it afresh next time."""
        self._texts.pop(path, None)
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)
            _release(1)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        _release(len(fds))
        self._texts.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
