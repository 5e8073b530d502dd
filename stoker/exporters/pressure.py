"""Pressure stall information as `stoker_host_pressure_seconds_total`."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily

from stoker.sources.pressure import PressureSnapshot


def families(snapshot: PressureSnapshot):
    total = CounterMetricFamily("stoker_host_pressure_seconds", "Time some (or all) runnable tasks of the host "
                                "were stalled waiting for that resource (Linux PSI).", labels=["resource", "kind"])
    for kind, totals in (("some", snapshot.some_seconds), ("full", snapshot.full_seconds)):
        for resource, seconds in sorted(totals.items()):
            total.add_metric([resource, kind], seconds)
    return [total]
