"""Where a simulated run keeps its tree: removed when the run ends, on SIGTERM too, and at the next
start after a kill -9.

Each run (`stoker run --simulate`, `stoker check --simulate`, `stoker replay`) lays out its simulated
kernel, mounts and state file in a directory of its own under the temporary directory ($TMPDIR),
`stoker-<kind>-*`. The run holds an exclusive flock on the directory's `.lock` for as long as it
lives, and the kernel drops that lock when the process ends, however it ends: a run killed with
SIGKILL (or by the OOM killer) leaves a directory whose lock anyone can take. Every run, before it
makes its own, removes those. The lock file appears only once it is locked (locked under another
name, then renamed), so a directory with a free `.lock` is always a dead run's. One without a
`.lock` is being made, or is a run of a release before this scheme, perhaps still going: it is
removed only once untouched for `GRACE`.

`stoker replay` and `stoker check` leave SIGTERM to Python's default, which ends the process at once
and skips every `finally`: while the directory exists, SIGTERM raises SystemExit instead, so the
`with` removes it (`stoker run` handles SIGTERM in its event loop, and returns).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
from typing import Iterator

LOCK = ".lock"
GRACE = 86400.0  # seconds a directory without a lock must have been left untouched before it is removed
NAME = re.compile(r"stoker-(sim|replay)-[A-Za-z0-9_]+")


@contextlib.contextmanager
def run_directory(kind: str) -> Iterator[str]:
    """A fresh directory for one simulated run (`kind`: sim or replay), removed when the block ends."""
    base = tempfile.gettempdir()
    remove_leftovers(base)
    root = tempfile.mkdtemp(prefix=f"stoker-{kind}-", dir=base)
    lock = _lock(root)
    restore = _exit_on_sigterm()
    try:
        yield root
    finally:
        restore()
        shutil.rmtree(root, ignore_errors=True)
        os.close(lock)


def remove_leftovers(base: str) -> list[str]:
    """Remove the trees of simulated runs that are gone (their lock is free); returns their paths."""
    removed = []
    try:
        names = [n for n in os.listdir(base) if NAME.fullmatch(n)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not _dead(path, st):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _dead(path: str, st: os.stat_result) -> bool:
    try:
        fd = os.open(os.path.join(path, LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return time.time() - st.st_mtime > GRACE
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its run holds it
    finally:
        os.close(fd)
    return True


def _lock(root: str) -> int:
    """The run's lock, held until its descriptor closes (or the process ends)."""
    staging = os.path.join(root, f"{LOCK}.new")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(staging, os.path.join(root, LOCK))
    return fd


def _exit_on_sigterm():
    """SIGTERM raises SystemExit (status 143) while Python's default would end the process; returns
    what undoes it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return lambda: None

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return restore
