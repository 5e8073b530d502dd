"""`stoker check`: a one-shot health check for a Slurm HealthCheckProgram or a node prolog.

It runs the agent's collectors (no HTTP) for a few seconds, prints what it saw
per GPU, port and mount with the verdict and its evidence, and exits 0 when
healthy, 1 when something is wrong, 2 when it could not check (no NVML on a
node configured for GPUs, a collector that never completed a cycle).

It says what it checked (GPUs, RDMA ports, NFS mounts, NAS probes) and exits
2, "nothing to check", when that is nothing: a HEALTHY that looked at nothing
(the GPU collector off, no RDMA device, no NFS mount, no probe target) would
pass a node whose hardware is missing. Fewer GPUs or RDMA ports than the node
should have ([inventory], or the most it has shown) are a problem.

A few seconds are not enough to learn what the running job sustains, so the
check judges the node's plumbing from the evidence itself: any network or
storage signal over its threshold (a port down, congestion, retransmissions,
PFC pauses, slow or queued NFS reads, slow writes, reads stopped, a slow or
hung NAS probe) is a problem, whatever the GPUs do; so are lost GPUs, XIDs,
pending row remaps and a stalled checkpoint. A starvation verdict is a problem
when the agent reaches one (strong evidence with the GPUs well below their
capacity); a checkpoint in progress is not.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TextIO

from stoker.agent.runtime import Agent

HEALTHY, UNHEALTHY, UNCHECKED = 0, 1, 2
INVENTORY_NAMES = {"gpu": "GPUs", "rdma_port": "RDMA ports"}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was looked at, e.g. "8 GPUs"

    def exit_code(self) -> int:
        if self.unchecked:
            return UNCHECKED
        return UNHEALTHY if self.problems else HEALTHY


async def run_check(agent: Agent, seconds: float) -> Report:
    await agent.start(serve_http=False)
    try:
        await asyncio.sleep(seconds)
        return report(agent)
    finally:
        await agent.stop()


def report(agent: Agent) -> Report:
    r = Report()
    never = [c.name for c in agent.collectors if c.name in agent.supervisor.stale()]
    r.unchecked += [f"collector {name} completed no cycle" for name in never]
    _gpus(agent, r)
    _ports(agent, r)
    _mounts(agent, r)
    _evidence(agent, r)
    _verdict(agent, r)
    _inventory(agent, r)
    _checked(agent, r)
    return r


def _checked(agent: Agent, r: Report) -> None:
    """What the check looked at; nothing at all is no health to report."""
    cfg = agent.config
    gpus = agent.gpu.snapshot.gpus if agent.gpu and agent.gpu.snapshot else []
    ports = agent.rdma.snapshot.ports if agent.rdma and agent.rdma.snapshot else []
    mounts = agent.nfs.snapshot.mounts if agent.nfs and agent.nfs.snapshot else []
    probes = agent.probes.states() if agent.probes else []
    seen = [(len(gpus), "GPU"), (len(ports), "RDMA port"), (len(mounts), "NFS mount"), (len(probes), "NAS probe")]
    r.checked = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in seen if n]
    if r.checked:
        return
    absent = [("the GPU collector is off" if agent.gpu is None else "no GPU answered"),
              ("the RDMA collector is off" if agent.rdma is None
               else f"no RDMA port in {cfg.agent.sysfs_root}/class/infiniband"),
              ("the NFS collector is off" if agent.nfs is None
               else f"no NFS mount in {cfg.agent.procfs_root}/self/mountstats"),
              "no NAS probe target ([[probes.targets]])"]
    r.unchecked.append("nothing to check: " + "; ".join(absent))


def _inventory(agent: Agent, r: Report) -> None:
    """Fewer GPUs or RDMA ports than the node should have (stoker_inventory_*)."""
    for kind, expected, present in agent.inventory.counts():
        if present is not None and expected is not None and present < expected:
            r.problems.append(f"{present} of {expected} {INVENTORY_NAMES[kind]} present ({agent.inventory.why(kind)})")


def _gpus(agent: Agent, r: Report) -> None:
    if agent.gpu is None:
        return
    snap = agent.gpu.snapshot
    r.lines.append("GPUs")
    if snap is None:
        why = agent.gpu.source.down or "NVML did not answer within the collector's deadline (a hung driver call?)"
        r.unchecked.append(f"NVML cannot be used: {why}")
        r.lines.append(f"  NVML cannot be used: {why}")
        return
    busy = agent.verdicts.busy if agent.verdicts else {}
    if any("gpm" in g.refused for g in snap.gpus):
        r.lines.append("  note: GPU profiling (GPM) is restricted to administrators; busy is utilization.gpu bounded "
                       "by power draw, weaker than GPM (docs/OPERATIONS.md: GPU profiling)")
    if any(g.activity_source == "none" for g in snap.gpus if g.up):
        r.lines.append("  note: NVML gives no activity for a MIG-enabled GPU without GPU profiling: its busy is "
                       "unknown (docs/OPERATIONS.md: supported drivers)")
    for g in snap.gpus:
        state = "up" if g.up else "LOST"
        b = busy.get((str(g.index), g.uuid))
        temp = g.temperature.get("gpu")
        source = {"gpm": "", "utilization": " (util)", "none": " (MIG, no activity)"}.get(g.activity_source, "")
        line = (f"  gpu {g.index}  {g.uuid}  {state:<4}  busy {_pct(b)}{source}  "
                f"{_num(temp, '°C')}  {_num(g.power_watts, ' W')}")
        if g.mig:
            line += "  MIG instances " + (", ".join(
                str(i.gpu_instance) + (f" ({len(i.pids)} process{'es' * (len(i.pids) > 1)})" if i.pids else "")
                for i in g.instances) or "none")
        if g.xid_counts:
            line += "  XID " + ",".join(f"{x}x{n}" for x, n in sorted(g.xid_counts.items()))
            r.problems.append(f"gpu {g.index}: XID {sorted(g.xid_counts)}")
        if not g.up:
            r.problems.append(f"gpu {g.index} lost")
        if g.remapped_rows.get("failure") or g.remapped_rows.get("pending"):
            r.problems.append(f"gpu {g.index}: row remapping pending or failed")
            line += "  ROW REMAP"
        r.lines.append(line)


def _ports(agent: Agent, r: Report) -> None:
    snap = agent.rdma.snapshot if agent.rdma else None
    if snap is None or not snap.ports:
        return
    r.lines.append("RDMA ports")
    net = {i.name: i for i in (agent.netdev.snapshot.interfaces if agent.netdev and agent.netdev.snapshot else [])}
    for p in snap.ports:
        iface = net.get(p.interface)
        link = "" if iface is None or iface.up is None else ("  link up" if iface.up else "  LINK DOWN")
        speed = f"{p.speed_bytes_per_second * 8 / 1e9:.0f} Gb/s" if p.speed_bytes_per_second else "-"
        r.lines.append(f"  {p.device}/{p.port}  {p.interface or '-':<14}  {p.state or '?':<8}  {speed}{link}")
        if p.up is False:
            r.problems.append(f"{p.device}/{p.port} is {p.state}")
        if iface is not None and iface.up is False:
            r.problems.append(f"{p.interface} link down")


def _mounts(agent: Agent, r: Report) -> None:
    snap = agent.nfs.snapshot if agent.nfs else None
    probes = {p.mountpoint: p for p in (agent.probes.states() if agent.probes else [])}
    if (snap is None or not snap.mounts) and not probes:
        return
    r.lines.append("NFS mounts")
    for m in snap.mounts if snap else []:
        line = f"  {m.mountpoint:<20} {m.role:<10} NFSv{m.version} {m.protocol} nconnect={m.nconnect}"
        p = probes.pop(m.mountpoint, None)
        r.lines.append(line + (_probe(p, agent, r) if p else ""))
    for p in probes.values():
        r.lines.append(f"  {p.mountpoint:<20} (not in mountstats)" + _probe(p, agent, r))


def _probe(p, agent: Agent, r: Report) -> str:
    hung = agent.config.detect.probe_hung_seconds
    if p.inflight_seconds > hung:
        r.problems.append(f"{p.mountpoint}: probe unanswered for {p.inflight_seconds:.0f} s")
        return f"  probe HUNG {p.inflight_seconds:.0f} s"
    failed = next((m.failures for m in agent.probes.mounts if m.target.mountpoint == p.mountpoint), {})
    if any(failed.values()):
        r.problems.append(f"{p.mountpoint}: probes failed: " +
                          ", ".join(f"{n} {reason}" for reason, n in sorted(failed.items()) if n))
    if not p.latest:
        return "  probe pending"
    return "  probe " + " ".join(f"{k} {v * 1000:.1f} ms" for k, v in p.latest.items())


def _evidence(agent: Agent, r: Report) -> None:
    """Network and storage signals seen during the check, each a problem of the node's plumbing."""
    if agent.verdicts is None:
        return
    seen = [(_plumbing(s), s.text) for s in agent.verdicts.snapshot.remembered]
    seen = sorted((where, text) for where, text in seen if where is not None)
    if not seen:
        return
    r.lines.append("Evidence")
    for where, text in seen:
        r.lines.append(f"  {where:<8} {text}")
        r.problems.append(f"{where}: {text}")


def _plumbing(signal) -> str | None:
    """The part of the node's plumbing a signal faults, if any: slow checkpoint writes are the NAS's."""
    if signal.kind == "checkpoint_write_latency":
        return "storage"
    return signal.cause if signal.cause in ("network", "storage") else None


def _verdict(agent: Agent, r: Report) -> None:
    if agent.verdicts is None:
        return
    v = agent.verdicts.snapshot
    r.lines.append("Verdict")
    if v.cause:
        level = "unknown yet" if v.baseline is None else _pct(v.baseline).strip()
        r.lines.append(f"  STARVED by {v.cause}: busy {_pct(v.busy).strip()} (the job's level: {level})")
        r.lines += [f"    - {e}" for e in v.evidence]
        if v.cause != "checkpoint":
            r.problems.append(f"GPUs starved by {v.cause}")
    else:
        r.lines.append(f"  not starved (busy {_pct(v.busy).strip()})")
    for m in v.checkpoints:
        if m.in_progress:
            state = "STALLED" if m.stalled else "in progress"
            r.lines.append(f"  checkpoint on {m.mountpoint}: {state}, {_bytes(m.written_bytes or 0)} written")
            if m.stalled:
                r.problems.append(f"checkpoint on {m.mountpoint} stalled")


def print_report(r: Report, out: TextIO) -> None:
    for line in r.lines:
        print(line, file=out)
    print(f"\nchecked: {', '.join(r.checked) or 'nothing'}", file=out)
    status = {HEALTHY: "HEALTHY", UNHEALTHY: "UNHEALTHY", UNCHECKED: "COULD NOT CHECK"}[r.exit_code()]
    print(f"\n{status}", file=out)
    for problem in r.unchecked + r.problems:
        print(f"  - {problem}", file=out)


def _pct(value: float | None) -> str:
    return "  -" if value is None else f"{100 * value:3.0f}%"


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"


def _num(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"
