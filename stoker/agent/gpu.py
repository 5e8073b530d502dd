"""The GPU collector: `GpuSource` in its worker thread, under a deadline."""

from __future__ import annotations

from typing import Any

from stoker.agent.sourced import SourceCollector
from stoker.exporters import gpu as gpu_families
from stoker.sources.gpu import GpuSource


def gpu_collector(nvml: Any, interval: float, slow_interval: float, call_timeout: float) -> SourceCollector:
    source = GpuSource(nvml, slow_interval=slow_interval)
    return SourceCollector("gpu", interval, source, gpu_families.families, call_timeout, close=source.close)
