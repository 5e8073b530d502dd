"""The simulated node's host: pressure stall information (`/proc/pressure/{cpu,memory,io}`).

PSI counts, in microseconds since boot, the time some (or all) runnable tasks
waited for a CPU, for memory reclaim or for I/O. The scenario's host condition
sets how fast those totals grow: a CPU-bound input pipeline makes tasks queue
for CPUs, memory pressure makes them stall in reclaim; a slow or hung NAS shows
as I/O waiting.
"""

from __future__ import annotations

import os
import threading

from stoker.sim.kernfs import KernelFiles
from stoker.sim.node import SimNode, Ticker

# share of wall time (0..1) by condition: resource -> (some, full)
HOST = {
    "normal": {"cpu": (0.03, 0.0), "memory": (0.0, 0.0), "io": (0.01, 0.004)},
    "cpu-bound": {"cpu": (0.9, 0.0), "memory": (0.0, 0.0), "io": (0.01, 0.004)},
    "memory-pressure": {"cpu": (0.08, 0.0), "memory": (0.42, 0.15), "io": (0.05, 0.02)},
}
IO_BY_STORAGE = {"slow-read": (0.35, 0.1), "slow-write": (0.2, 0.05), "write-stall": (0.3, 0.1), "hung": (0.6, 0.3)}
BOOT_TOTALS_US = {"cpu": 8.1e9, "memory": 3.2e7, "io": 4.4e9}


class SimHost:
    def __init__(self, node: SimNode, procfs_root: str):
        self.node = node
        self.directory = os.path.join(procfs_root, "pressure")
        self.totals = {r: [t, t / 3] for r, t in BOOT_TOTALS_US.items()}  # resource -> [some, full] microseconds
        self._ticker = Ticker(node)
        self._lock = threading.Lock()
        self._files = KernelFiles()  # in place, as the kernel shows them (one page each)
        self._paths = {r: os.path.join(self.directory, r) for r in BOOT_TOTALS_US}

    def build(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.advance()

    def advance(self) -> None:
        with self._lock:
            _, dt = self._ticker.tick()
            step = self.node.step()
            shares = dict(HOST[step.host])
            if step.storage in IO_BY_STORAGE:
                shares["io"] = IO_BY_STORAGE[step.storage]
            for resource, (some, full) in shares.items():
                totals = self.totals[resource]
                totals[0] += some * dt * 1e6
                totals[1] += full * dt * 1e6
                lines = [f"{kind} avg10={100 * share:.2f} avg60={100 * share:.2f} avg300={100 * share:.2f} "
                         f"total={int(total)}" for kind, share, total in (("some", some, totals[0]),
                                                                            ("full", full, totals[1]))]
                self._files.put(self._paths[resource], "\n".join(lines) + "\n")
