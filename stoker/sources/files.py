"""Reading kernel files (sysfs, procfs) tolerantly.

`FileReader` is the file-system boundary: tests replace `read` to inject
EINVAL or EACCES (as root, chmod cannot make a sysfs file fail). `Backoff`
keeps a failing file from being read every cycle: some firmware queries
behind sysfs counters log a kernel warning on each failed read.

Every sysfs attribute and procfs statistics file is a regular file. Anything
else in its place (a FIFO, a device node, a directory) is refused before it is
read: opening a FIFO for reading blocks until a writer comes, and a character
device can stream forever. The open itself is non-blocking for that reason.

`KeptFiles` keeps each file it read open and reads it again with one
`pread` at offset 0: sysfs calls the attribute's show() again for a read at
offset 0 (Documentation/filesystems/sysfs.rst), so the value is as fresh as
after open/read/close, for one system call instead of four. A kept file can
go stale in two ways, both handled:
- the kernel removes the attribute (driver reload, hot unplug): a read of the
  old descriptor fails with ENODEV; the file is opened afresh and read again.
- the file is replaced by another inode (a rename over it, unlink and create,
  a directory or symlink above it changed): once per cycle, before the first
  read of one of its files, each directory that holds kept files is stat'ed;
  when it is not the one it was (inode, mtime, ctime, size), its files are
  closed and opened again at their next read. Timestamps are coarse (a
  jiffy), so a directory modified within `RACY_NS` of the check is checked
  again next cycle, as git does with racily clean index entries. A directory
  none of whose files a cycle reads is not checked in that cycle (a reader
  with tiers reads some files every few cycles only); `refresh(everything=
  True)` checks them all, and closes the files of those that are gone.
At most a quarter of the soft descriptor limit is kept open (the HTTP
listener takes another quarter); past it, files are read the old way.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import stat
import threading
import time


class BadValue(ValueError):
    """A file that was read but holds no usable number (garbage, `N/A (no PMA)`)."""

    def __init__(self, reason: str, text: str):
        super().__init__(f"{reason}: {text[:60]!r}")
        self.reason = reason


class NotRegularFile(OSError):
    """A FIFO, device node or directory where the kernel puts a regular file."""

    reason = "not_regular_file"


def read_regular(path: str, limit: int, follow: bool = True) -> bytes:
    """The bytes of a regular file, at most `limit`, never blocking on what is not one. Read to its
    end: procfs hands a seq_file out one buffer (about a page) per read. `follow` False: a symbolic
    link at `path` is refused (ELOOP), as for a file the agent also writes."""
    fd = open_regular(path, follow)
    try:
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_regular(path: str, follow: bool = True) -> int:
    """A descriptor of the regular file at `path`; never blocks on what is not one."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"not a regular file: {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


class Unanswered(OSError):
    """A read given up at its deadline: the file sits on a mount whose server does not answer."""

    reason = "unanswered"


_stuck: dict[str, threading.Thread] = {}  # path -> the thread still in a read given up on
_stuck_lock = threading.Lock()


def read_regular_within(path: str, limit: int, deadline: float) -> bytes:
    """`read_regular` of a file the operator points at (configuration, web configuration, hint token),
    given up past `deadline` seconds with `Unanswered`.

    The non-blocking open keeps a FIFO from blocking, but a regular file on a hard NFS mount whose
    server is away blocks open() and read() in the kernel until it answers, and only a fatal signal
    ends that wait: SIGTERM with a handler does not. So the read runs in a daemon thread of its own and
    the caller waits at most `deadline`; the thread is left to its read and ends when it returns, or
    with the process (a daemon thread does not hold up the interpreter's exit, and the exit's SIGKILL
    ends the kernel's wait). While a read of `path` is stuck, the next one fails at once: a stream of
    reloads against a hung file leaves one thread, not one per reload."""
    with _stuck_lock:
        if path in _stuck:
            raise Unanswered(errno.ETIMEDOUT, "still waiting for an earlier read of it to return", path)
    outcome: list = []
    done = threading.Event()

    def read() -> None:
        try:
            outcome.append((True, read_regular(path, limit)))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))
        with _stuck_lock:  # done, and out of `_stuck`, at once for the caller
            done.set()
            if _stuck.get(path) is threading.current_thread():
                del _stuck[path]

    thread = threading.Thread(target=read, name="stoker-read", daemon=True)
    thread.start()
    if not done.wait(deadline):
        with _stuck_lock:
            if not done.is_set():
                _stuck[path] = thread
                raise Unanswered(errno.ETIMEDOUT, f"no answer within {deadline:g} s (a hung network mount?)",
                                 path)
    ok, value = outcome[0]
    if ok:
        return value
    raise value


class Refused(ValueError):
    """A file the operator points at cannot be used; the message says why, without the path."""


def shown(path: str) -> str:
    """A path as an error message shows it: quoted when it holds what a terminal would not show (a NUL)."""
    return path if path.isprintable() else repr(path)


def read_operator_file(path: str, limit: int, deadline: float | None = None) -> str:
    """The UTF-8 text of a file the operator points at (configuration, scenario, rules, hint token):
    `read_regular` at most `limit` bytes, within `deadline` seconds when given (`read_regular_within`:
    Unanswered past it). Every other failure is `Refused`, one reason, for the caller to prefix with
    what the file is and where."""
    try:
        data = read_regular(path, limit + 1) if deadline is None else read_regular_within(path, limit + 1, deadline)
    except Unanswered:
        raise
    except NotRegularFile:
        raise Refused("not a regular file") from None
    except OSError as exc:
        raise Refused(f"cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL in the path
        raise Refused("cannot read: the path holds a NUL byte") from None
    if len(data) > limit:
        raise Refused(f"larger than {limit >> 20} MiB" if limit >= 1 << 20 else f"larger than {limit >> 10} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"not UTF-8 text (byte {exc.start})") from None


CHUNK = 1 << 16
PAGE = 4096  # a sysfs attribute's show() fills at most one page
KEPT_MAX = 4096
LIST_TTL = 60.0  # seconds: a listing of an unchanged directory is taken again this often all the same
RACY_NS = 50_000_000  # a directory's timestamps are this close to now: they may change again unseen
GONE = frozenset({errno.ENODEV, errno.ENOENT, errno.ESTALE, errno.EBADF})  # the kept file is no longer there


class FileReader:
    """Open, read and close on every read: the plain boundary (tests override `read`)."""

    def read(self, path: str) -> str:
        return read_regular(path, PAGE).decode("ascii", "replace")

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def refresh(self, everything: bool = True) -> None:
        """Called once per cycle, before the reads; `everything`: the cycle may read any file."""

    def close(self) -> None:
        """Release what the reader holds."""


class _Dir:
    """A directory holding kept files: its identity when last checked (None: check again), the cycle
    of that check, its kept paths, its listing."""

    __slots__ = ("path", "identity", "checked", "paths", "listing")

    def __init__(self, path: str, identity: tuple | None, cycle: int):
        self.path, self.identity, self.checked = path, identity, cycle
        self.paths: set[str] = set()
        self.listing: tuple | None = None  # (identity, relist after, names)


class KeptFiles(FileReader):
    """Each file kept open and read again with one pread at offset 0 (see the module's doc)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[int, _Dir]] = {}  # path -> kept descriptor, its directory
        self._dirs: dict[str, _Dir] = {}
        self._cycle = 0
        self._limit: int | None = None

    def read(self, path: str) -> str:
        kept = self._open.get(path)
        if kept is not None and kept[1].checked != self._cycle:
            self._check(kept[1])
            kept = self._open.get(path)  # closed if its directory changed
        if kept is not None:
            try:
                return os.pread(kept[0], PAGE, 0).decode("ascii", "replace")
            except OSError as exc:
                self._close(path)
                if exc.errno not in GONE:
                    raise
                # the attribute was removed under the descriptor: read whatever is there now
        return self._first_read(path).decode("ascii", "replace")

    def _first_read(self, path: str) -> bytes:
        if len(self._open) >= self._capacity():
            return read_regular(path, PAGE)
        directory = os.path.dirname(path)
        entry = self._dirs.get(directory)
        if entry is None:  # the directory's identity is taken before the file is opened
            entry = self._dirs[directory] = _Dir(directory, _identity(directory, time.time_ns()), self._cycle)
        fd = open_regular(path)
        try:
            data = os.pread(fd, PAGE, 0)
        except BaseException:
            os.close(fd)
            raise
        self._open[path] = (fd, entry)
        entry.paths.add(path)
        return data

    def _capacity(self) -> int:
        if self._limit is None or len(self._open) >= self._limit:  # the soft limit may have been raised since
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self._limit = KEPT_MAX if soft == resource.RLIM_INFINITY else min(KEPT_MAX, soft // 4)
        return self._limit

    def refresh(self, everything: bool = True) -> None:
        """A new cycle: each directory is checked again before its files are read. With `everything`,
        every directory now, and the files of those that are gone closed."""
        self._cycle += 1
        if everything:
            for entry in list(self._dirs.values()):
                self._check(entry)

    def _check(self, entry: _Dir) -> None:
        """Close the kept files of a directory that changed since its last check."""
        identity = _identity(entry.path, time.time_ns())
        if identity is None or identity != entry.identity:
            for path in list(entry.paths):
                self._close(path)
            if identity is None and not os.path.isdir(entry.path):
                self._dirs.pop(entry.path, None)
        entry.identity, entry.checked = identity, self._cycle

    def listdir(self, path: str) -> list[str]:
        """A directory holding kept files is listed again when it changed, or after `LIST_TTL`."""
        entry = self._dirs.get(path)
        if entry is not None and entry.checked != self._cycle:
            self._check(entry)
        if entry is None or entry.identity is None:
            return sorted(os.listdir(path))
        listing, now = entry.listing, time.monotonic()
        if listing is None or listing[0] != entry.identity or now >= listing[1]:
            listing = entry.listing = (entry.identity, now + LIST_TTL, sorted(os.listdir(path)))
        return listing[2]

    def _close(self, path: str) -> None:
        kept = self._open.pop(path, None)
        if kept is not None:
            kept[1].paths.discard(path)
            os.close(kept[0])

    def kept(self) -> int:
        """How many files are kept open."""
        return len(self._open)

    def close(self) -> None:
        for path in list(self._open):
            self._close(path)
        self._dirs.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _identity(directory: str, now_ns: int) -> tuple | None:
    """What tells one directory from another at that path, and its last change; None when it
    changed too recently to be trusted (or is not there)."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


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
