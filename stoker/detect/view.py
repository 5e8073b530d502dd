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
    sampled: dict[str, float] = field(default_factory=dict)  # collector -> when its snapshot was taken (else t)


IDLE_POWER_SHARE = 0.17  # the recorded H200 with nothing running: 121 W of its 700 W limit
WORKING_POWER_SHARE = 0.8  # SMs busy with matrix work draw most of the limit (the saturated phase: 673 W)


def gpu_busy(view: NodeView) -> dict[tuple[str, str], float]:
    """Per GPU: GPM SM activity where available, else what `utilization.gpu` and power say together."""
    out = {}
    if view.gpu is None:
        return out
    for g in view.gpu.gpus:
        if not g.up:
            continue
        value = g.gpm["sm_active"] if "sm_active" in g.gpm else without_gpm(g)
        if value is not None:
            out[(str(g.index), g.uuid)] = value
    return out


def without_gpm(g) -> float | None:
    """`utilization.gpu` counts a GPU busy while any kernel or copy runs: copy-bound work reads 15%
    with 0.3% SM activity. Copies leave the SMs, and so the power draw, near idle; so without GPM
    the busy ratio is the lower of utilisation and where power sits between idle and working."""
    if g.utilization is None:
        return None
    if g.power_watts is None or not g.power_limit_watts:
        return g.utilization
    by_power = (g.power_watts - IDLE_POWER_SHARE * g.power_limit_watts) / (
        (WORKING_POWER_SHARE - IDLE_POWER_SHARE) * g.power_limit_watts)
    return min(g.utilization, max(0.0, min(1.0, by_power)))
