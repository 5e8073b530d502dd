"""The GPU collector: `GpuSource` in its worker thread, under a deadline."""

from __future__ import annotations

from typing import Any

from stoker.agent.collector import Collector
from stoker.agent.worker import CollectorError, Worker
from stoker.exporters import gpu as gpu_families
from stoker.sources.gpu import GpuSnapshot, GpuSource, LibraryDown


class GpuCollector(Collector):
    name = "gpu"

    def __init__(self, nvml: Any, interval: float, slow_interval: float, call_timeout: float):
        self.interval = interval
        self.call_timeout = call_timeout
        self.source = GpuSource(nvml, slow_interval=slow_interval)
        self.snapshot: GpuSnapshot | None = None
        self._worker = Worker(self.name)

    async def cycle(self) -> list[str]:
        try:
            snapshot = await self._worker.call(self.source.sample, timeout=self.call_timeout)
        except LibraryDown as exc:
            self.snapshot = None  # no NVML: no GPU series rather than stale ones
            raise CollectorError(exc.reason, str(exc)) from exc
        self.snapshot = snapshot
        return snapshot.problems

    def families(self):
        return gpu_families.families(self.snapshot)

    async def close(self) -> None:
        self.source.xid.stop()
        try:
            await self._worker.call(self.source.close, timeout=1.0)
        except CollectorError:
            pass  # the driver is hung: the daemon thread is abandoned at exit
        self._worker.close()
