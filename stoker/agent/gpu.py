"""The GPU collector: `GpuSource` in its worker thread, under a deadline.

A driver replaced under the running agent (sources/gpu.py, `DriverReplaced`) cannot be recovered from in
this process: the collector asks the agent to stop, and the agent exits with `EXIT_DRIVER_REPLACED`, which
the unit's `Restart=on-failure` restarts (docs/OPERATIONS.md, supported drivers).
"""

from __future__ import annotations

from typing import Any, Callable

from stoker import logs
from stoker.agent.sourced import SourceCollector
from stoker.agent.worker import CollectorError
from stoker.exporters import gpu as gpu_families
from stoker.sources.gpu import DriverReplaced, GpuSource

log = logs.get("gpu")

EXIT_DRIVER_REPLACED = 75
"""The agent's exit status when the NVIDIA driver was replaced under it: EX_TEMPFAIL of sysexits.h (try
again later), a failure to systemd, and not the configuration error (2) that RestartPreventExitStatus names."""


class GpuCollector(SourceCollector):
    def __init__(self, source: GpuSource, interval: float, call_timeout: float,
                 on_driver_replaced: Callable[[], None] | None):
        super().__init__("gpu", interval, source, gpu_families.families, call_timeout, close=source.close)
        self._on_driver_replaced = on_driver_replaced

    async def cycle(self) -> list[str]:
        try:
            return await super().cycle()
        except CollectorError as exc:
            if isinstance(exc.__cause__, DriverReplaced) and self._on_driver_replaced is not None:
                log.error("exiting for a restart", reason=exc.reason, exit_status=EXIT_DRIVER_REPLACED)
                self._on_driver_replaced()
            raise


def gpu_collector(nvml: Any, interval: float, slow_interval: float, call_timeout: float,
                  on_driver_replaced: Callable[[], None] | None = None) -> GpuCollector:
    """`on_driver_replaced`: what ends the agent when the driver changed under it."""
    return GpuCollector(GpuSource(nvml, slow_interval=slow_interval), interval, call_timeout, on_driver_replaced)
