"""process_*: the agent's own CPU, memory, descriptors and start time, as every Prometheus client serves them.

The families of prometheus-client's ProcessCollector (prometheus_client/process_collector.py): the same
names, help, types and values, read more cheaply, because they are read whenever the agent's own chunk
of the exposition is rendered (at most once per scrape, after a cycle). prometheus-client opens and
parses /proc/self/stat and /proc/self/limits and lists /proc/self/fd on every collection: 1.2 ms with
the 800 descriptors the agent holds on a full XE9680 (the RDMA counter files stay open), about a scrape's
own time. Here:

- memory from /proc/self/statm (the same vsize and rss, in pages), kept open and read with pread;
- CPU from times(2) (`os.times`: the same utime and stime ticks as /proc/self/stat);
- the start time once, at start;
- the open descriptors as the size of /proc/self/fd, which Linux gives since 6.2 (fs/proc/fd.c,
  proc_fd_getattr; Documentation/filesystems/proc.rst); on an older kernel (size 0) by listing the
  directory, at most every `LIST_FDS_EVERY` seconds;
- the descriptor limit from getrlimit(2), the soft limit /proc/self/limits shows.

Always the real /proc, never `agent.procfs_root`: these describe the agent itself, not the node (or
the simulator's tree) it watches. Without /proc (not Linux) there are none, as with prometheus-client.
"""

from __future__ import annotations

import os
import resource
import time
import weakref
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PROC = "/proc"
LIST_FDS_EVERY = 10.0


def start_time() -> float:
    """When this process started, seconds since the epoch: boot time plus /proc/self/stat's starttime."""
    with open(f"{PROC}/stat", "rb") as fh:
        boot = next(float(line.split()[1]) for line in fh if line.startswith(b"btime "))
    with open(f"{PROC}/self/stat", "rb") as fh:
        ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK") + boot


def listed_fds() -> int:
    """The open descriptors by listing /proc/self/fd, less the one the listing itself holds."""
    return len(os.listdir(f"{PROC}/self/fd")) - 1


class ProcessMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._pagesize = resource.getpagesize()
        self._listed: tuple[float, int] | None = None  # (when, count) on kernels before 6.2
        try:
            self._started = start_time()
            self._statm = os.open(f"{PROC}/self/statm", os.O_RDONLY)
        except (OSError, StopIteration, IndexError, ValueError):
            self._started = None
            return
        weakref.finalize(self, os.close, self._statm)
        try:
            self._fd_dir: int | None = os.open(f"{PROC}/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            weakref.finalize(self, os.close, self._fd_dir)
        except OSError:
            self._fd_dir = None

    def collect(self) -> Iterable[Metric]:
        """The registry protocol; what cannot be read yields nothing rather than failing the chunk."""
        if self._started is None:
            return []
        try:
            size, resident = os.pread(self._statm, 128, 0).split()[:2]
            open_fds = self._open_fds()
        except (OSError, ValueError):
            return []
        cpu = os.times()
        return [
            GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                              value=float(int(size) * self._pagesize)),
            GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                              value=float(resident) * self._pagesize),
            GaugeMetricFamily("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                              value=self._started),
            CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                                value=cpu.user + cpu.system),
            GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", open_fds),
            GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                              value=float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])),
        ]

    def _open_fds(self) -> int:
        size = os.fstat(self._fd_dir).st_size if self._fd_dir is not None else 0
        if size > 0:
            return size
        now = self._clock()
        if self._listed is None or now - self._listed[0] >= LIST_FDS_EVERY:
            self._listed = (now, listed_fds())
        return self._listed[1]
