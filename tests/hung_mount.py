"""Files that read as on a hung NFS mount; `python -m tests.hung_mount ARGS...` runs `stoker ARGS...` so.

A regular file on a hard NFS mount whose server is away blocks open() and read() in the kernel until
the server answers (fs/nfs: the waits are TASK_KILLABLE, so only a fatal signal ends them; a signal
with a handler, as asyncio installs for SIGTERM, does not). This machine has no NFS server to lose, so
the file-system boundary is replaced: `os.open` of a path for which `<path>.hung` exists blocks until
the mount is released, in whichever thread calls it (the runner never releases it). Python's lock wait
is resumed after every signal whose handler returns, as the kernel resumes the NFS wait: the process
ends on SIGKILL, or on a signal without a handler (its default action: exit), as with a real hung mount.

`STOKER_TEST_READ_DEADLINE`: the seconds an operator's file may take (config.READ_DEADLINE), shortened
so the tests do not wait the agent's 5 s.
"""

from __future__ import annotations

import os
import sys
import threading


class HungMount:
    """`os.open` of a path marked with `<path>.hung` waits for `release()`."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.waiting = 0  # opens that came to a marked path
        self._real_open = os.open

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        if isinstance(path, str) and os.path.exists(path + ".hung"):
            self.waiting += 1
            self.released.wait()
        return self._real_open(path, flags, mode, dir_fd=dir_fd)

    def release(self) -> None:
        self.released.set()


def main() -> int:
    os.open = HungMount().open
    from stoker import cli, config
    if "STOKER_TEST_READ_DEADLINE" in os.environ:
        config.READ_DEADLINE = float(os.environ["STOKER_TEST_READ_DEADLINE"])
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
