"""Ethernet-side samples of the RoCE NICs as the `stoker_net_*` families of METRICS.md."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stoker.sources.netdev import NetSnapshot


def families(snapshot: NetSnapshot):
    up = GaugeMetricFamily("stoker_net_up", "1 while the interface is operationally up.", labels=["interface"])
    frames = CounterMetricFamily("stoker_net_pause_frames", "PFC pause frames (rx: the switch paused us).",
                                 labels=["interface", "priority", "direction"])
    seconds = CounterMetricFamily("stoker_net_pause_seconds", "PFC pause duration.",
                                  labels=["interface", "priority", "direction"])
    discards = CounterMetricFamily("stoker_net_discards", "Discard counters, by ethtool name.",
                                   labels=["interface", "counter"])
    storms = CounterMetricFamily("stoker_net_pause_storm_events", "Pause storm events.",
                                 labels=["interface", "severity"])
    phys = CounterMetricFamily("stoker_net_physical_bytes", "All bytes on the wire (RoCE included).",
                               labels=["interface", "direction"])
    for i in snapshot.interfaces:
        if i.up is not None:
            up.add_metric([i.name], 1 if i.up else 0)
        for (priority, direction), value in i.pause_frames.items():
            frames.add_metric([i.name, priority, direction], value)
        for (priority, direction), value in i.pause_seconds.items():
            seconds.add_metric([i.name, priority, direction], value)
        for name, value in i.discards.items():
            discards.add_metric([i.name, name], value)
        for severity, value in i.storms.items():
            storms.add_metric([i.name, severity], value)
        for direction, value in i.physical_bytes.items():
            phys.add_metric([i.name, direction], value)
    return [up, frames, seconds, discards, storms, phys]
