"""`peer`: GPUs that wait for the other nodes of their job, not for anything on this node.

A data-parallel step ends in collectives (an all-reduce of the gradients), which are barriers: one
slow node makes the GPUs of every other node of the job wait. The engine judges this node alone;
with no network, storage, checkpoint or host evidence it calls the wait `host` (its residual cause:
the input pipeline or the CPU), so a NAS crawling under one node of a 16-node job used to read
`storage` there and `host` on the fifteen others. Nothing local is not the host.

`PeerJudge.judge` is called once per tick with the engine's verdict. It turns a `host` verdict that
has no host evidence of its own (no CPU or memory pressure) into `peer` when

- **the job spans other nodes** (`Span`): the job said so in its step hints (`nodes`: its world
  size over its local world size, or its scheduler's node count, from its own environment), or its
  collectives crossed the fabric: while it ran at its level, at least half of the node's RDMA ports
  each moved `FABRIC_BYTES_PER_SECOND` (a single-node job's collectives stay on NVLink; storage
  traffic, where it uses these NICs at all, uses one or two of them);
- **and nothing says the wait is local**: the GPUs do not idle between kernels (utilization.gpu,
  the share of time a kernel runs, under `RESIDENT`: a rank blocked in a collective keeps its
  kernel resident, so GPUs without a kernel part of the time wait for something else, a late
  input pipeline on this node, host-to-device copies), and the job's steps do not report that they
  wait for their next batch (`DATA_WAIT_LOCAL` of the step time or more).

The waiting signature (docs/VERDICTS.md, "Peer" has the sources): a rank blocked in an NCCL
collective keeps NCCL's kernel resident and spinning on a few SMs of its own, so utilization.gpu
reads nearly 100% while the SMs are mostly idle (SM activity about the channels over the SMs,
tensor activity near 0, power near idle). `waiting` is that: utilization at least `RESIDENT` and
`GAP` above the busy ratio. Where the signature cannot be read (no utilization), a job that spans
nodes and waits with nothing local to explain it is still `peer`: the fleet's rules then look
for the node that holds it back (alerts/stoker.rules.yml, StokerJobHeldBackByNode).

Everything else passes through: a local cause is the node's own, and the fleet names it as the
origin of the job's wait.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from stoker.detect.goodput import UNKNOWN
from stoker.detect.policy import CAUSE_NAMES, RESIDUAL, WEIGHTS

if TYPE_CHECKING:
    from stoker.detect.goodput import GoodputLedger
    from stoker.detect.view import NodeView

PEER = "peer"
VERDICT_CAUSES = CAUSE_NAMES + (PEER,)
"""Every cause a verdict can name: the engine's local causes and `peer`."""

RESIDENT = 0.8
"""utilization.gpu at or above this: a kernel runs nearly all the time (a spinning collective does); under
it the GPUs have no kernel part of the time (the recorded input-starved phase: 20%; copy-bound: 15%)."""
GAP = 0.3
"""utilization.gpu this far above the busy ratio: the kernel that runs keeps few SMs busy (the evidence's
strength is the gap over this)."""
FABRIC_BYTES_PER_SECOND = 1e9
"""Per RDMA port, both directions: a rail carrying a job's collectives (8 Gbit/s, 2% of a 400 Gb/s
link; an all-reduce at a job's level moves tens of GB/s a rail)."""
DATA_WAIT_LOCAL = 0.3
"""Share of its step time a job waits for its next batch on this node: its input pipeline is late here."""
DATA_WAIT_STEPS = 3
"""The data wait share is measured over the job's last few reported steps (a loader late a minute ago
says nothing of the wait now)..."""
DATA_WAIT_WINDOW = 120.0
"""... reported within this long."""


@dataclass
class Span:
    """What this agent knows of how many nodes a job spans."""

    fabric_at: float | None = None  # the tick its collectives were first seen crossing the fabric: it spans nodes
    quiet_at: float | None = None  # the last tick it ran at its level with the fabric quiet
    waits: deque = field(default_factory=lambda: deque(maxlen=256))  # (t, steps, data wait, step seconds)

    def multinode(self, nodes: int | None) -> tuple[bool | None, str]:
        """(spans other nodes, how the agent knows: hint | fabric); (None, "") when it does not."""
        if nodes is not None:
            return nodes > 1, "hint"
        if self.fabric_at is not None:
            return True, "fabric"
        return (False, "fabric") if self.quiet_at is not None else (None, "")


class PeerJudge:
    def __init__(self) -> None:
        self.spans: dict[str, Span] = {}
        self.seconds = 0.0  # time the verdict was `peer` (counted as the engine counts: the interval after)
        self.active = False  # the last tick's verdict was `peer`
        self.waiting: float | None = None  # last tick: utilization - busy ratio while a kernel was resident
        self._last_t: float | None = None
        self._fabric: tuple[object, float] | None = None  # the last distinct RDMA snapshot and when
        self._pids: frozenset[int] = frozenset()

    def shown(self, engine_cause: str | None) -> str | None:
        """The verdict the last tick showed, given the engine's."""
        return PEER if self.active else engine_cause

    def starved_seconds(self, engine: Mapping[str, float]) -> dict[str, float]:
        """The engine's time starved by cause, the time this judge turned into `peer` moved out of the
        residual's (the engine counted it as its own)."""
        out = dict(engine)
        out[RESIDUAL] = out.get(RESIDUAL, 0.0) - self.seconds
        out[PEER] = self.seconds
        return out

    def judge(self, t: float, cause: str | None, reasons: list[str], view: NodeView, scores: dict[str, float],
              ledger: GoodputLedger, pids: frozenset[int], at_level: bool, busy: float | None
              ) -> tuple[str | None, list[str]]:
        """The tick's final cause and its reasons."""
        if self.active and self._last_t is not None:
            self.seconds += max(0.0, t - self._last_t)
        self._last_t = t
        jobs = self._jobs(ledger, pids)
        self._observe_fabric(t, view, jobs, at_level)
        self._observe_steps(t, jobs, ledger)
        self.waiting, idle, utilization = _signature(view, busy)
        self.active = False
        if cause != RESIDUAL or scores.get(RESIDUAL, 0.0) >= WEIGHTS.explains:
            return cause, reasons
        spans = [(job_id, *self.spans[job_id].multinode(_nodes(ledger, job_id))) for job_id in jobs]
        multi = [(job_id, how) for job_id, many, how in spans if many]
        if not multi:
            return cause, reasons
        local = self._data_wait(jobs)
        if local is not None and local >= DATA_WAIT_LOCAL:
            return cause, [f"the job's steps wait {100 * local:.0f}% of their time for the next batch: the "
                           "input pipeline on this node is late, not a peer", *reasons]
        if idle:
            return cause, [f"the GPUs run no kernel {100 - 100 * utilization:.0f}% of the time: the wait is on "
                           "this node, not a peer", *reasons]
        self.active = True
        job_id, how = multi[0]
        nodes = _nodes(ledger, job_id)
        span = f"job {job_id} spans {nodes} nodes (its step hints)" if how == "hint" else \
            f"job {job_id} spans other nodes (its collectives cross the fabric)"
        signature = (f"a collective kernel runs {100 * utilization:.0f}% of the time while the SMs work "
                     f"{100 * busy:.0f}%: waiting for the other nodes") if self.waiting is not None else \
            "nothing on this node explains the wait"
        return PEER, [span, signature]

    def _jobs(self, ledger: GoodputLedger, pids: frozenset[int]) -> list[str]:
        """The jobs holding the GPUs (at the ledger's last tick); the unknown job's span is forgotten when
        its processes are replaced (nothing tells that job from the next)."""
        if self._pids and pids and not (pids & self._pids):
            self.spans.pop(UNKNOWN, None)
        self._pids = pids or self._pids
        jobs = sorted({b.job_id for bindings in ledger.gpus.values() for b in bindings})
        for job_id in jobs:
            self.spans.setdefault(job_id, Span())
        for gone in [j for j in self.spans if j not in jobs and j not in ledger.jobs]:
            del self.spans[gone]
        return jobs

    def _observe_fabric(self, t: float, view: NodeView, jobs: list[str], at_level: bool) -> None:
        """Traffic on the rails while the node's only job runs at its level: its collectives cross the
        fabric (or they do not). Several jobs on the node: whose traffic it is cannot be told. GPUs whose
        processes are not placed yet (`unknown`: a lookup that timed out is tried again later) beside one
        job are taken as that job's."""
        rdma = view.rdma
        if rdma is None or (self._fabric is not None and self._fabric[0] is rdma):
            return
        taken = view.sampled.get("rdma", view.t)
        before, self._fabric = self._fabric, (rdma, taken)
        known = [j for j in jobs if j != UNKNOWN] or jobs
        if before is None or len(known) != 1 or not at_level or taken <= before[1]:
            return
        span = self.spans[known[0]]
        if span.fabric_at is not None:
            return  # known to span nodes: nothing more to learn from its traffic
        old = {(p.device, p.port): p.traffic for p in before[0].ports}
        rates = [sum(max(0.0, p.traffic.get(k, 0.0) - old[(p.device, p.port)].get(k, 0.0))
                     for k in ("transmit_bytes", "receive_bytes")) / (taken - before[1])
                 for p in rdma.ports if (p.device, p.port) in old]
        if not rates:
            return
        if 2 * sum(1 for r in rates if r >= FABRIC_BYTES_PER_SECOND) >= len(rates):
            span.fabric_at = t
        else:
            span.quiet_at = t

    def _observe_steps(self, t: float, jobs: list[str], ledger: GoodputLedger) -> None:
        for job_id in jobs:
            acct = ledger.jobs.get(job_id)
            if acct is None or acct.data_wait_seconds is None:
                continue
            waits = self.spans[job_id].waits
            if not waits:  # the steps before the agent looked: counted from nothing
                waits.append((t, 0, 0.0, 0.0))
            sample = (t, acct.steps, acct.data_wait_seconds, acct.step_seconds.total)
            if not waits or sample[1:] != waits[-1][1:]:
                waits.append(sample)
            while waits and t - waits[0][0] > DATA_WAIT_WINDOW:
                waits.popleft()

    def _data_wait(self, jobs: list[str]) -> float | None:
        """The largest share of step time the node's jobs waited for their next batch, over their last
        `DATA_WAIT_STEPS` steps reported within `DATA_WAIT_WINDOW`; None without such hints."""
        shares = []
        for job_id in jobs:
            waits = self.spans[job_id].waits
            if len(waits) < 2:
                continue
            now = waits[-1]
            base = next((w for w in reversed(waits) if w[1] <= now[1] - DATA_WAIT_STEPS), waits[0])
            if now[3] > base[3]:
                shares.append((now[2] - base[2]) / (now[3] - base[3]))
        return max(shares) if shares else None

    def multinode(self, ledger: GoodputLedger) -> dict[str, tuple[bool, str]]:
        """job id -> (spans other nodes, hint | fabric), for the jobs the agent knows it of."""
        out = {}
        for job_id, span in self.spans.items():
            many, how = span.multinode(_nodes(ledger, job_id))
            if many is not None:
                out[job_id] = (many, how)
        return out


def _nodes(ledger: GoodputLedger, job_id: str) -> int | None:
    acct = ledger.jobs.get(job_id)
    return None if acct is None else acct.nodes


def _signature(view: NodeView, busy: float | None) -> tuple[float | None, bool, float | None]:
    """(utilization - busy ratio when a kernel is resident and few SMs work, else None; the GPUs run no
    kernel part of the time; the mean utilization), over the GPUs that answer."""
    if busy is None or view.gpu is None:
        return None, False, None
    values = [g.utilization for g in view.gpu.gpus if g.up and g.utilization is not None]
    if not values:
        return None, False, None
    utilization = sum(values) / len(values)
    resident = utilization >= RESIDENT
    waiting = utilization - busy if resident and utilization - busy >= GAP else None
    return waiting, not resident, utilization
