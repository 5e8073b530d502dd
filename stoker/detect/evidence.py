"""Evidence: each signal of the node that could explain starved GPUs, with its strength.

A `Signal` is one measurement over its threshold on one source ("mlx5_3/1
down", "/mnt/data: READ takes 95 ms"), with the cause it points at and its
strength: the measured value over the threshold, 1 at the threshold. The
attribution (attribution.py) weighs signals by strength and by timing; this
module only measures, each source over its own last two distinct samples (the
collectors sample on their own ticks, so a snapshot the verdict already saw is
not a new window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stoker.config import DetectConfig
from stoker.detect.policy import SIGNALS
from stoker.detect.view import NodeView
from stoker.sources.nfs import MS

CONGESTION = ("np_ecn_marked_roce_packets", "np_cnp_sent", "rp_cnp_handled")
RETRANSMITS = ("out_of_sequence", "packet_seq_err", "local_ack_timeout_err", "roce_adp_retrans",
               "req_transport_retries_exceeded")
PORT_DOWN = 4.0
"""Strength of a port or link that was up and went down: well past any threshold."""
PORT_NEVER_UP = 2.0
"""A port down since the agent started while most of its siblings are up: on a rail-optimised node
every port carries a GPU's traffic, but the agent cannot tell an uncabled spare from a lost rail."""

SOURCES = {"rdma": "rdma", "net": "netdev", "nfs": "nfs", "host": "host"}
"""NodeView field -> the collector that fills it."""


@dataclass(frozen=True)
class Signal:
    kind: str
    source: str  # device/port, interface, mountpoint, or "node"
    strength: float  # measured / threshold
    text: str  # for the operator

    @property
    def cause(self) -> str:
        return SIGNALS[self.kind].cause

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source


class _Window:
    """The last two distinct snapshots of one source, and when each was taken."""

    def __init__(self):
        self.old: tuple[Any, float] | None = None
        self.new: tuple[Any, float] | None = None

    def see(self, snapshot: Any, t: float) -> bool:
        """True when `snapshot` is new (the collector sampled again)."""
        if snapshot is None or (self.new is not None and self.new[0] is snapshot):
            return False
        self.old, self.new = self.new, (snapshot, t)
        return self.old is not None

    def pair(self) -> tuple[Any, Any, float]:
        (old, t0), (new, t1) = self.old, self.new
        return old, new, max(1e-6, t1 - t0)


class EvidenceTracker:
    """Measures signals each tick. Keeps what a signal needs beyond one window: which ports and
    links were ever up, when each data mount last completed a READ, the previous window's
    signals of a source that did not sample again."""

    def __init__(self, config: DetectConfig):
        self.config = config
        self._ports_seen_up: set[tuple[str, str]] = set()
        self._ifaces_seen_up: set[str] = set()
        self._last_read: dict[str, tuple[float, float]] = {}  # mountpoint -> (READ ops, when it last grew)
        self._windows = {name: _Window() for name in SOURCES}
        self._held: dict[str, list[Signal]] = {name: [] for name in self._windows}

    def new_job(self) -> None:
        """A new job: whether the data mounts were being read is a question about this job."""
        self._last_read.clear()
        self._held = {name: [s for s in held if not SIGNALS[s.kind].of_the_job] for name, held in self._held.items()}

    def measured(self) -> bool:
        """Every source that has sampled has given a window: what is absent from the signals is
        absent from the node, not yet to be measured (a source needs two samples; after a start,
        one that is late on a loaded machine needs more ticks)."""
        return all(w.new is None or w.old is not None for w in self._windows.values())

    def signals(self, view: NodeView) -> list[Signal]:
        out: list[Signal] = []
        for name, measure in (("rdma", self._rdma), ("net", self._net), ("nfs", self._nfs), ("host", self._host)):
            window = self._windows[name]
            if window.see(getattr(view, name), view.sampled.get(SOURCES[name], view.t)):
                self._held[name] = measure(*window.pair())
            elif getattr(view, name) is None:
                self._held[name] = []
            out += self._held[name]
        out += self._probes(view)
        return out

    # -- network ----------------------------------------------------------------------------

    def _rdma(self, old, new, dt: float) -> list[Signal]:
        out = []
        up = [p for p in new.ports if p.up]
        before = {(p.device, p.port): p for p in old.ports}
        for p in new.ports:
            key, name = (p.device, p.port), f"{p.device}/{p.port}"
            if p.up:
                self._ports_seen_up.add(key)
            elif p.up is False and key in self._ports_seen_up:
                out.append(Signal("port_down", name, PORT_DOWN, f"{name} down"))
            elif p.up is False and len(up) * 2 > len(new.ports):
                out.append(Signal("port_down", name, PORT_NEVER_UP, f"{name} down (since the agent started)"))
            prev = before.get(key)
            if prev is None:
                continue
            congestion = max(_rates(prev.hw_counters, p.hw_counters, CONGESTION, dt), default=0.0)
            out += self._over("congestion", name, congestion, f"{name}: {congestion:.0f} ECN/CNP per s")
            retrans = sum(_rates(prev.hw_counters, p.hw_counters, RETRANSMITS, dt))
            out += self._over("retransmits", name, retrans, f"{name}: {retrans:.0f} retransmits per s")
        return out

    def _net(self, old, new, dt: float) -> list[Signal]:
        out = []
        before = {i.name: i for i in old.interfaces}
        for i in new.interfaces:
            if i.up:
                self._ifaces_seen_up.add(i.name)
            elif i.up is False and i.name in self._ifaces_seen_up:
                out.append(Signal("link_down", i.name, PORT_DOWN, f"{i.name} down"))
            prev = before.get(i.name)
            if prev is None:
                continue
            paused = sum(max(0.0, v - prev.pause_seconds.get(k, v)) for k, v in i.pause_seconds.items()
                         if k[1] == "rx") / dt
            out += self._over("pfc_pause", i.name, paused, f"{i.name}: PFC-paused {100 * paused:.0f}% of the time")
        return out

    # -- storage ------------------------------------------------------------------------------

    def _nfs(self, old, new, dt: float) -> list[Signal]:
        out = []
        t = self._windows["nfs"].new[1]
        before = {m.mountpoint: m for m in old.mounts}
        mounted = {m.mountpoint for m in new.mounts}
        for gone in [mp for mp in self._last_read if mp not in mounted]:
            del self._last_read[gone]
        for m in new.mounts:
            prev = before.get(m.mountpoint)
            if m.role != "checkpoint":
                out += self._reads(m, prev, t)
            per_op = _per_op(prev, m, "WRITE")
            if per_op is None:
                continue
            if m.role == "checkpoint":  # only checkpoints write there: GPUs waiting on them wait on a checkpoint
                out += self._over("checkpoint_write_latency", m.mountpoint, per_op[0],
                                  f"{m.mountpoint}: checkpoint WRITE takes {1000 * per_op[0]:.0f} ms")
            else:
                out += self._over("write_latency", m.mountpoint, per_op[0],
                                  f"{m.mountpoint}: WRITE takes {1000 * per_op[0]:.0f} ms")
        return out

    def _reads(self, m, prev, t: float) -> list[Signal]:
        out = []
        ops = m.ops.get("READ", {}).get("ops")  # None: no READ line, or its count not plausible: not measured
        last = self._last_read.get(m.mountpoint)
        if ops is not None:
            if last is None or ops > last[0]:
                self._last_read[m.mountpoint] = (ops, t if last is not None else float("-inf"))
            elif m.role == "data" and last[1] > float("-inf"):
                out += self._over("reads_stalled", m.mountpoint, t - last[1],
                                  f"{m.mountpoint}: no READ completed for {t - last[1]:.0f} s")
        per_op = _per_op(prev, m, "READ")
        if per_op is None:
            return out
        execute, queue = per_op
        out += self._over("read_latency", m.mountpoint, execute, f"{m.mountpoint}: READ takes {1000 * execute:.0f} ms")
        out += self._over("read_queue", m.mountpoint, queue, f"{m.mountpoint}: READ queued {1000 * queue:.0f} ms")
        return out

    def _probes(self, view: NodeView) -> list[Signal]:
        out = []
        for p in view.probes:
            out += self._over("probe_hung", p.mountpoint, p.inflight_seconds,
                              f"{p.mountpoint}: probe unanswered for {p.inflight_seconds:.0f} s")
            slowest = max(p.latest.items(), key=lambda kv: kv[1], default=None)
            if slowest is not None:
                out += self._over("probe_slow", p.mountpoint, slowest[1],
                                  f"{p.mountpoint}: {slowest[0]} probe took {slowest[1]:.1f} s")
        return out

    def _over(self, kind: str, source: str, value: float, text: str) -> list[Signal]:
        """The signal, when the value is past its threshold ([detect], named by its row of SIGNALS);
        its strength is how far."""
        if value <= 0:
            return []  # most windows of a healthy node: nothing to compare (every threshold is positive)
        threshold = getattr(self.config, SIGNALS[kind].threshold)
        return [Signal(kind, source, value / threshold, text)] if value > threshold else []

    # -- host -----------------------------------------------------------------------------------

    def _host(self, old, new, dt: float) -> list[Signal]:
        out = []
        for resource, kind in (("cpu", "cpu_pressure"), ("memory", "memory_pressure")):
            share = sum(_rates(old.some_seconds, new.some_seconds, (resource,), dt))
            out += self._over(kind, "node", share,
                         f"{resource} pressure: tasks waited {100 * share:.0f}% of the time")
        return out


PER_OP = ("ops", "execute_ms", "queue_ms")
"""The counts of an operation's mountstats line that _per_op reads; the parser leaves out a count that is
not plausible (stoker/sources/mountstats.py), and a window missing one in either sample is not measured."""


def _per_op(prev, m, op: str) -> tuple[float, float] | None:
    """Seconds of execute and queue time per `op` completed in the window; None when none completed or
    the window is not measured (a count missing: taken as 0, one sample's huge total would read as latency)."""
    a, b = prev.ops.get(op, {}) if prev is not None else {}, m.ops.get(op, {})
    if any(k not in a or k not in b for k in PER_OP):
        return None
    done = b["ops"] - a["ops"]
    if done <= 0:
        return None
    return (b["execute_ms"] - a["execute_ms"]) * MS / done, (b["queue_ms"] - a["queue_ms"]) * MS / done


def _rates(before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...], dt: float) -> list[float]:
    """Per second, of the counters in both samples (a counter that went back, reset, counts 0)."""
    return [max(0.0, after[k] - before[k]) / dt for k in keys if k in before and k in after]
