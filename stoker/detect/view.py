"""What the detectors see of the node at one instant: the collectors' latest snapshots.

`Evidence` turns two consecutive views (the last sampling window) into the reasons
the network or the storage could be starving the GPUs, each worded for the
operator ("mlx5_0/1: 6120 CNP/s"), so a verdict carries its own explanation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stoker.config import DetectConfig
from stoker.sources.gpu import GpuSnapshot
from stoker.sources.netdev import NetSnapshot
from stoker.sources.nfs import MS, NfsSnapshot
from stoker.sources.rdma import RdmaSnapshot

CONGESTION = ("np_ecn_marked_roce_packets", "np_cnp_sent", "rp_cnp_handled")
RETRANSMITS = ("out_of_sequence", "packet_seq_err", "local_ack_timeout_err", "roce_adp_retrans",
               "req_transport_retries_exceeded")


@dataclass
class ProbeState:
    mountpoint: str
    inflight_seconds: float
    latest: dict[str, float]  # probe -> seconds of the last completed one


@dataclass
class NodeView:
    t: float  # monotonic seconds
    gpu: GpuSnapshot | None = None
    rdma: RdmaSnapshot | None = None
    net: NetSnapshot | None = None
    nfs: NfsSnapshot | None = None
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


def job_present(view: NodeView, memory_floor: float) -> bool:
    """A job is on the node: a compute process, or framebuffer held above the floor
    (processes in other PID namespaces are invisible to NVML)."""
    if view.gpu is None:
        return False
    return any(g.up and ((g.processes or 0) > 0 or (g.memory_used_bytes or 0) > memory_floor)
               for g in view.gpu.gpus)


@dataclass
class Evidence:
    network: list[str] = field(default_factory=list)
    storage: list[str] = field(default_factory=list)


class EvidenceTracker:
    """Keeps what evidence needs beyond two views: which ports were ever up, when each
    data mount last completed a READ."""

    def __init__(self, config: DetectConfig):
        self.config = config
        self._ports_seen_up: set[tuple[str, str]] = set()
        self._ifaces_seen_up: set[str] = set()
        self._last_read: dict[str, tuple[float, float]] = {}  # mountpoint -> (READ ops, when it last grew)

    def evidence(self, old: NodeView, new: NodeView) -> Evidence:
        ev = Evidence()
        dt = max(1e-6, new.t - old.t)
        self._network(old, new, dt, ev)
        self._storage(old, new, dt, ev)
        return ev

    def _network(self, old: NodeView, new: NodeView, dt: float, ev: Evidence) -> None:
        c = self.config
        if new.rdma is not None:
            before = {(p.device, p.port): p for p in (old.rdma.ports if old.rdma else [])}
            for p in new.rdma.ports:
                key = (p.device, p.port)
                if p.up:
                    self._ports_seen_up.add(key)
                elif p.up is False and key in self._ports_seen_up:
                    ev.network.append(f"{p.device}/{p.port} down")
                prev = before.get(key)
                if prev is None:
                    continue
                congestion = max(_rate(prev.hw_counters, p.hw_counters, k, dt) for k in CONGESTION)
                if congestion > c.cnp_per_second:
                    ev.network.append(f"{p.device}/{p.port}: {congestion:.0f} ECN/CNP per s")
                retrans = sum(_rate(prev.hw_counters, p.hw_counters, k, dt) for k in RETRANSMITS)
                if retrans > c.retransmits_per_second:
                    ev.network.append(f"{p.device}/{p.port}: {retrans:.0f} retransmits per s")
        if new.net is not None:
            before_if = {i.name: i for i in (old.net.interfaces if old.net else [])}
            for i in new.net.interfaces:
                if i.up:
                    self._ifaces_seen_up.add(i.name)
                elif i.up is False and i.name in self._ifaces_seen_up:
                    ev.network.append(f"{i.name} down")
                prev = before_if.get(i.name)
                if prev is None:
                    continue
                paused = sum(v - prev.pause_seconds.get(k, v) for k, v in i.pause_seconds.items() if k[1] == "rx")
                if paused / dt > c.pause_ratio:
                    ev.network.append(f"{i.name}: PFC-paused {100 * paused / dt:.0f}% of the time")

    def _storage(self, old: NodeView, new: NodeView, dt: float, ev: Evidence) -> None:
        c = self.config
        if new.nfs is not None:
            before = {m.mountpoint: m for m in (old.nfs.mounts if old.nfs else [])}
            for m in new.nfs.mounts:
                if m.role == "checkpoint":
                    continue
                read = m.ops.get("READ", {})
                ops = read.get("ops", 0.0)
                last = self._last_read.get(m.mountpoint)
                if last is None or ops > last[0]:
                    self._last_read[m.mountpoint] = (ops, new.t if last is not None else float("-inf"))
                elif m.role == "data" and new.t - last[1] > c.reads_stalled_after and last[1] > float("-inf"):
                    ev.storage.append(f"{m.mountpoint}: no READ completed for {new.t - last[1]:.0f} s")
                prev = before.get(m.mountpoint)
                done = ops - (prev.ops.get("READ", {}).get("ops", ops) if prev else ops)
                if done <= 0:
                    continue
                execute = (read.get("execute_ms", 0) - prev.ops["READ"].get("execute_ms", 0)) * MS / done
                queue = (read.get("queue_ms", 0) - prev.ops["READ"].get("queue_ms", 0)) * MS / done
                if execute > c.read_latency_seconds:
                    ev.storage.append(f"{m.mountpoint}: READ takes {1000 * execute:.0f} ms")
                if queue > c.read_queue_seconds:
                    ev.storage.append(f"{m.mountpoint}: READ queued {1000 * queue:.0f} ms")
        for p in new.probes:
            if p.inflight_seconds > c.probe_hung_seconds:
                ev.storage.append(f"{p.mountpoint}: probe unanswered for {p.inflight_seconds:.0f} s")
            for probe, seconds in p.latest.items():
                if seconds > c.probe_latency_seconds:
                    ev.storage.append(f"{p.mountpoint}: {probe} probe took {seconds:.1f} s")


def _rate(before: dict[str, Any], after: dict[str, Any], key: str, dt: float) -> float:
    if key not in before or key not in after:
        return 0.0
    return max(0.0, after[key] - before[key]) / dt
