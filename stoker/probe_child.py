"""The NAS probe worker: the only Stoker code that touches an NFS path.

It runs as a child process of the agent, one per probed mount, so that a hung
hard mount blocks this process in the kernel and never the agent's event loop
or threads. Protocol: one line `probe` on stdin, one JSON line on stdout with
the seconds each probe took, or its error:

    {"write": 0.0123, "read": 0.0045, "metadata": 0.0031}
    {"write": 0.0123, "read": {"error": "EIO"}, "metadata": 0.0031}

Imports are kept to the standard library so the child starts fast.

The child dies with the agent, however the agent ends. An orderly stop kills
it; a kill -9 or an OOM kill of the agent does not, and a child blocked on a
hung mount never reads the end of its stdin: 10 such kills left 18 children.
So the child asks the kernel for SIGKILL when its parent goes
(prctl(PR_SET_PDEATHSIG), include/uapi/linux/prctl.h), and exits at once if
the agent is already gone. The signal comes when the parent THREAD ends, not
the process: the agent forks its children from the event loop's thread
(asyncio.create_subprocess_exec runs there), which lives as long as the agent.
NFS waits are killable (TASK_KILLABLE), so a child blocked on a hung hard
mount goes too.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import sys
import time

BLOCK = 1 << 20


def _error(exc: OSError) -> dict:
    return {"error": errno.errorcode.get(exc.errno or 0, type(exc).__name__)}


def _timed(fn, *args):
    started = time.perf_counter()
    try:
        fn(*args)
    except OSError as exc:
        return _error(exc)
    return time.perf_counter() - started


PAGE = 4096
STAMP = 16  # fresh random bytes at the start of every 4 KiB of the block, for each probe
_block: bytearray | None = None


def fresh_block(size: int) -> bytearray:
    """Random bytes that no earlier probe wrote, so the NAS can neither compress nor deduplicate them.
    The block is drawn once per child and each 4 KiB of it gets a new random stamp per probe: every
    page differs from every page written before, for 4 KiB of randomness instead of 1 MiB (3 ms of
    CPU per probe, most of a probe's cost; docs/PERFORMANCE.md)."""
    global _block
    if _block is None or len(_block) != size:
        _block = bytearray(os.urandom(size))
    stamps = os.urandom(STAMP * ((size + PAGE - 1) // PAGE))
    for i, at in enumerate(range(0, size, PAGE)):
        _block[at:at + STAMP] = stamps[i * STAMP:(i + 1) * STAMP]
    return _block


def write_fsync(path: str, size: int) -> None:
    """A fresh file (created, or truncated if a crash left one), written and flushed to the server."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = memoryview(fresh_block(min(size, BLOCK)))
        left = size
        while left > 0:
            left -= os.write(fd, block[:left])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_uncached(path: str, size: int) -> None:
    """Read the file back from the server: O_DIRECT where the file system allows it,
    else after dropping its pages from the client cache."""
    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))  # page-aligned, as O_DIRECT needs
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        while os.readv(fd, [buf]) > 0:
            pass
    finally:
        os.close(fd)
        buf.close()


def metadata(path: str) -> None:
    """Create (exclusively: the NAS must make the file), stat and remove a file. A probe killed in
    the middle (a hung mount) can leave it behind: removed first, or every later probe would fail."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.stat(path)
    os.unlink(path)


CHECK_TAG = "check"  # `stoker check`'s probes, beside the service's


def probe_file(host: str, tag: str = "") -> str:
    """The probe's file name: the host's (nodes share the NAS directory) and the prober's `tag`
    (`stoker check` beside the service never uses the service's files)."""
    return f".stoker-probe-{host}{'-' + tag if tag else ''}"


def probe(directory: str, size: int, tag: str = "") -> dict:
    base = os.path.join(directory, probe_file(socket.gethostname(), tag))
    result = {"write": _timed(write_fsync, base, size)}
    result["read"] = _timed(read_uncached, base, size) if isinstance(result["write"], float) else result["write"]
    result["metadata"] = _timed(metadata, base + ".meta")
    try:
        os.unlink(base)
    except OSError:
        pass
    return result


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL when the thread that forked this process ends (see the module's doc); exit now if
    `parent`, the agent, is no longer it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the agent ended before the request: no signal will come
        os._exit(1)


def main() -> None:
    directory, size, tag, parent = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    die_with_parent(parent)
    for line in sys.stdin:
        if line.strip() != "probe":
            continue
        sys.stdout.write(json.dumps(probe(directory, size, tag)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
