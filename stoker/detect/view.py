"""What the detectors see of the node at one instant: the collectors' latest snapshots."""

from __future__ import annotations

from dataclasses import dataclass, field

from stoker.sources.gpu import GpuSnapshot
from stoker.sources.netdev import NetSnapshot
from stoker.sources.nfs import NfsSnapshot
from stoker.sources.pressure import PressureSnapshot
from stoker.sources.rdma import RdmaSnapshot


@dataclass
class ProbeState:
    mountpoint: str
    inflight_seconds: float  # since the mount last answered a probe, while it does not
    latest: dict[str, float]  # probe -> seconds of the last completed one


@dataclass
class NodeView:
    t: float  # monotonic seconds
    gpu: GpuSnapshot | None = None
    rdma: RdmaSnapshot | None = None
    net: NetSnapshot | None = None
    nfs: NfsSnapshot | None = None
    host: PressureSnapshot | None = None
    probes: list[ProbeState] = field(default_factory=list)


def gpu_busy(view: NodeView) -> dict[tuple[str, str], float]:
    """Per GPU: GPM SM activity where available, NVML utilisation otherwise."""
    out = {}
    if view.gpu is None:
        return out
    for g in view.gpu.gpus:
        if not g.up:
            continue
        value = g.gpm.get("sm_active", g.utilization)
        if value is not None:
            out[(str(g.index), g.uuid)] = value
    return out
