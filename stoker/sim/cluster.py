"""A simulated cluster: N simulated XE9680 nodes, jobs that span some of them, faults on a few.

A cluster scenario (TOML, docs/SCENARIOS.md "Clusters") names how many nodes there are, the jobs
that hold them (each on its own nodes, from `start` to `end`), faults (a node's network, storage
or host condition for a while) and checkpoints (every node of a job writes at once). It compiles
to one node scenario per node (`Cluster.scenarios`), which the ordinary simulated node plays, and
a `Coupling` that ties the nodes of a job together the way a data-parallel step does:

- a node's **own speed** is what its GPUs would do alone: its recorded phase's SM activity against
  the saturated phase's (a node starved by its NAS or its CPU: the input-starved phase, 18%);
- the **job's speed** is the slowest of its nodes' (the all-reduce at the end of each step is a
  barrier), and its step hints follow it on every node;
- a faster node **waits for its peers** the rest of the time: its GPUs compute at the job's speed
  and spend the remainder in a collective, whose GPU signature `waiting_row` models (NCCL's kernel
  resident on a few SMs of its own: utilization.gpu 100%, SM activity 16 of 132 SMs, no tensor
  work, power near idle; docs/VERDICTS.md "Peer" has the sources), and its rails carry collective
  traffic only while it computes;
- a job on one node moves nothing on the fabric (NVLink carries its collectives).

Every node is its own simulated node (its own kernel tree, NVML, agent, hint API); only the
scenario's time couples them, so each agent's work stays apart whether they run in one process
(`serve`) or on a manual clock (`ClusterDrive`). A single node's scenario picks its job as before;
in a cluster each job has its own name, so nodes of different jobs hold different jobs.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stoker.sim import scenarios
from stoker.sim.node import phase_speed
from stoker.sim.scenarios import SCHEDULERS, Expectation, Scenario, ScenarioError, Step

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MAX_NODES = 512
NODE_NAME = "node-{:02d}"


# -- the scenario -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    name: str
    nodes: tuple[int, ...]
    start: float = 0.0
    end: float = float("inf")
    scheduler: str = "slurm"
    level: float = 1.0
    step_rate: float = 0.0
    tokens_per_step: int = 0


@dataclass(frozen=True)
class Fault:
    nodes: tuple[int, ...]
    start: float
    end: float
    gpu: str = "input_starved"
    network: str = "normal"
    storage: str = "normal"
    host: str = "normal"


@dataclass(frozen=True)
class Checkpoint:
    job: str
    start: float
    seconds: float
    hint: bool = False


@dataclass
class ClusterScenario:
    name: str
    description: str
    nodes: int
    jobs: tuple[Job, ...]
    faults: tuple[Fault, ...] = ()
    checkpoints: tuple[Checkpoint, ...] = ()
    expect: dict[int, list[Expectation]] = field(default_factory=dict)  # node -> its expectations

    def names(self) -> list[str]:
        return [NODE_NAME.format(i) for i in range(self.nodes)]

    def job_of(self, node: int, t: float) -> Job | None:
        return next((j for j in self.jobs if node in j.nodes and j.start <= t < j.end), None)


def _nodes(value, count: int, where: str) -> tuple[int, ...]:
    """`3`, `"0-15"`, `"7"` or a list of those: node indexes."""
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        elif isinstance(item, str) and item.strip():
            low, _, high = item.partition("-")
            try:
                out += range(int(low), int(high or low) + 1)
            except ValueError:
                raise ScenarioError(f"{where}: {item!r} is not a node, a range a-b, or a list of them") from None
        else:
            raise ScenarioError(f"{where}: {item!r} is not a node, a range a-b, or a list of them")
    if not out or any(not 0 <= n < count for n in out):
        raise ScenarioError(f"{where}: nodes must be from 0 to {count - 1}")
    return tuple(sorted(set(out)))


def _table(table, keys: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: expected a table")
    scenarios._known(table, keys, where)
    return table


def _job(table, count: int, where: str) -> Job:
    t = _table(table, {"name", "nodes", "start", "end", "scheduler", "level", "step_rate", "tokens_per_step"}, where)
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{where}.name: required, a string")
    start = scenarios._number(t, "start", where, 0.0)
    tokens = t.get("tokens_per_step", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ScenarioError(f"{where}.tokens_per_step: expected a whole number from 0")
    return Job(name, _nodes(t.get("nodes"), count, f"{where}.nodes"), start, _until(t, "end", where, start),
               scenarios._check(t.get("scheduler", "slurm"), SCHEDULERS, f"{where}.scheduler"),
               scenarios._number(t, "level", where, 1.0, 0.0, 1.0),
               scenarios._number(t, "step_rate", where, 0.0, 0.0, 1000.0), tokens)


def _until(table: dict, key: str, where: str, start: float) -> float:
    """An end in scenario seconds, after `start`; none given: to the end of the scenario."""
    return float("inf") if table.get(key) is None else scenarios._number(table, key, where, low=start)


def _fault(table, count: int, where: str) -> Fault:
    t = _table(table, {"nodes", "from", "to", "gpu", "network", "storage", "host"}, where)
    start = scenarios._number(t, "from", where)
    return Fault(_nodes(t.get("nodes"), count, f"{where}.nodes"), start, _until(t, "to", where, start),
                 scenarios._check(t.get("gpu", "input_starved"), scenarios.GPU_PHASES, f"{where}.gpu"),
                 scenarios._check(t.get("network", "normal"), scenarios.NETWORK, f"{where}.network"),
                 scenarios._check(t.get("storage", "normal"), scenarios.STORAGE, f"{where}.storage"),
                 scenarios._check(t.get("host", "normal"), scenarios.HOST, f"{where}.host"))


def parse(text: str, name: str) -> ClusterScenario:
    """A cluster scenario from TOML text; ScenarioError names the key that is wrong."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{name}: not valid TOML: {exc}") from None
    _table(table, {"description", "nodes", "jobs", "faults", "checkpoints", "expect"}, name)
    count = table.get("nodes")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NODES:
        raise ScenarioError(f"{name}.nodes: expected a number of nodes from 1 to {MAX_NODES}")
    jobs = tuple(_job(j, count, f"{name}.jobs[{i}]") for i, j in enumerate(table.get("jobs", [])))
    if not jobs:
        raise ScenarioError(f"{name}: needs at least one [[jobs]] table")
    if len({j.name for j in jobs}) != len(jobs):
        raise ScenarioError(f"{name}.jobs: two jobs have the same name")
    for a in jobs:
        for b in jobs:
            if a is not b and set(a.nodes) & set(b.nodes) and a.start < b.end and b.start < a.end:
                raise ScenarioError(f"{name}.jobs: {a.name} and {b.name} hold the same node at the same time")
    checkpoints = []
    for i, c in enumerate(table.get("checkpoints", [])):
        where = f"{name}.checkpoints[{i}]"
        c = _table(c, {"job", "from", "seconds", "hint"}, where)
        if c.get("job") not in {j.name for j in jobs}:
            raise ScenarioError(f"{where}.job: not one of the jobs")
        if not isinstance(c.get("hint", False), bool):
            raise ScenarioError(f"{where}.hint: expected true or false")
        checkpoints.append(Checkpoint(c["job"], scenarios._number(c, "from", where),
                                      scenarios._number(c, "seconds", where, low=0.1), c.get("hint", False)))
    expect: dict[int, list[Expectation]] = {}
    for i, e in enumerate(table.get("expect", [])):
        where = f"{name}.expect[{i}]"
        e = _table(e, {"nodes", *scenarios.EXPECT_KEYS}, where)
        nodes = _nodes(e.get("nodes"), count, f"{where}.nodes")
        one = scenarios._expectation({k: v for k, v in e.items() if k != "nodes"}, where)
        for n in nodes:
            expect.setdefault(n, []).append(one)
    faults = tuple(_fault(f, count, f"{name}.faults[{i}]") for i, f in enumerate(table.get("faults", [])))
    return ClusterScenario(name, str(table.get("description", "")), count, jobs, faults, tuple(checkpoints), expect)


def load(path: str) -> ClusterScenario:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    return parse(text, Path(path).stem)


# -- compiled: one node scenario per node, and the coupling --------------------------------------

class Cluster:
    def __init__(self, spec: ClusterScenario):
        self.spec = spec
        self.scenarios = [self._compile(n) for n in range(spec.nodes)]
        self.coupling = Coupling(self)

    def _compile(self, node: int) -> Scenario:
        spec = self.spec
        times = {0.0}
        for j in spec.jobs:
            if node in j.nodes:
                times.update(x for x in (j.start, j.end) if x != float("inf"))
        for f in spec.faults:
            if node in f.nodes:
                times.update(x for x in (f.start, f.end) if x != float("inf"))
        for c in spec.checkpoints:
            job = next(j for j in spec.jobs if j.name == c.job)
            if node in job.nodes:
                times.update((c.start, c.start + c.seconds))
        bounds = sorted(times)
        steps = []
        for a, b in zip(bounds, [*bounds[1:], None]):
            steps.append(self._step(node, a, (b - a) if b is not None else 1e9))
        return Scenario(NODE_NAME.format(node), tuple(steps), spec.description, loop=False,
                        expect=tuple(spec.expect.get(node, [])), shared_jobs=True)

    def _step(self, node: int, t: float, duration: float) -> Step:
        job = self.spec.job_of(node, t)
        if job is None:
            return Step("idle_after", duration, job="")
        fault = next((f for f in self.spec.faults if node in f.nodes and f.start <= t < f.end), None)
        ckpt = next((c for c in self.spec.checkpoints if c.job == job.name and c.start <= t < c.start + c.seconds),
                    None)
        phase = "checkpoint" if ckpt is not None else fault.gpu if fault is not None else "saturated"
        return Step(phase, duration, network=fault.network if fault else "normal",
                    storage=fault.storage if fault else "normal", host=fault.host if fault else "normal",
                    job=job.name, level=job.level, hint=ckpt is not None and ckpt.hint, scheduler=job.scheduler,
                    step_rate=job.step_rate, tokens_per_step=job.tokens_per_step)


class Coupling:
    """How each node of a job waits for the others; a pure function of the scenario's time."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        speeds = phase_speed()
        self._own = []  # per node: (step starts, speeds)
        for sc in cluster.scenarios:
            starts, t = [], 0.0
            for s in sc.steps:
                starts.append(t)
                t += s.duration
            self._own.append((starts, [speeds[s.gpu_phase] if s.has_job else 0.0 for s in sc.steps]))
        self._jobs: dict[str, tuple[list[float], list[float]]] = {}  # job -> its speed from each boundary
        for job in cluster.spec.jobs:
            bounds = sorted({b for n in job.nodes for b in self._own[n][0]})
            self._jobs[job.name] = (bounds, [min(self.own(n, b) for n in job.nodes) for b in bounds])

    def own(self, node: int, t: float) -> float:
        starts, speeds = self._own[node]
        return speeds[max(0, bisect.bisect_right(starts, t) - 1)]

    def job(self, node: int, t: float) -> Job | None:
        job = self.cluster.spec.job_of(node, t)
        return job if job is not None and len(job.nodes) > 1 else None

    def job_speed(self, job: Job, t: float) -> float:
        bounds, speeds = self._jobs[job.name]
        return speeds[max(0, bisect.bisect_right(bounds, t) - 1)]

    def waiting(self, node: int, t: float) -> float:
        """The share of time the node's GPUs wait for the job's other nodes (0 when none)."""
        job = self.job(node, t)
        if job is None:
            return 0.0
        own = self.own(node, t)
        slowest = self.job_speed(job, t)
        return 0.0 if own <= slowest + 1e-9 else 1.0 - slowest / own

    def speed(self, node: int, t: float) -> float | None:
        """The job's speed where the node's job spans nodes (its steps go at it); None: on its own."""
        job = self.job(node, t)
        return None if job is None else self.job_speed(job, t)

    def nodes(self, node: int, t: float) -> int | None:
        job = self.cluster.spec.job_of(node, t)
        return None if job is None else len(job.nodes)

    def fabric(self, node: int, t: float) -> bool:
        """The node's job's collectives cross the fabric (it spans nodes)."""
        return self.job(node, t) is not None


# -- running it ----------------------------------------------------------------------------------

def scratch() -> str | None:
    """Where the nodes' kernel trees go: memory (/dev/shm) where there is one, as sysfs and procfs are
    (thousands of small files rewritten each second; on a disk each create costs milliseconds)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def simulations(cluster: Cluster, root: str) -> list:
    """One simulated node per cluster node, each in its own tree under `root`, coupled; the scenario's time
    starts for all of them at once, when the first is laid out."""
    from stoker.sim.simulation import Simulation

    out = []
    for i, sc in enumerate(cluster.scenarios):
        sim = Simulation(sc, os.path.join(root, NODE_NAME.format(i)), name="")  # the job's ids on all its nodes
        sim.node.couple(cluster.coupling, i)
        out.append(sim)
    for sim in out:
        sim.node.started = out[0].node.started
    return out


async def serve(cluster: Cluster, ports: list[int], root: str, overrides: dict | None = None,
                stop: asyncio.Event | None = None, host: str = "127.0.0.1", started_file: str | None = None) -> None:
    """Every node of the cluster a complete agent on its own port, in this event loop, until `stop`. The
    scenario's time starts when the nodes are laid out: `started_file` gets that instant (Unix time)."""
    from stoker import config
    from stoker.agent.runtime import Agent, run_side_by_side

    agents = []
    stop = stop or asyncio.Event()
    sims = simulations(cluster, root)
    cluster.started = time.time() - sims[0].node.elapsed()
    if started_file:
        Path(started_file).write_text(f"{cluster.started}\n")
    for sim, port in zip(sims, ports):
        cfg = config.load(overrides={**(overrides or {}), "agent": {
            **(overrides or {}).get("agent", {}), "listen": f"{host}:{port}"},
            "checkpoint": {"listen": "127.0.0.1:0"}})
        agents.append(Agent(sim.configure(cfg), sim.platform()))
    await run_side_by_side(agents, stop)


def targets(cluster: Cluster, ports: list[int], host: str = "127.0.0.1") -> list[dict]:
    """A Prometheus file_sd list: each node's agent with its `node` label."""
    return [{"targets": [f"{host}:{p}"], "labels": {"node": name}} for name, p in zip(cluster.spec.names(), ports)]


def run(args) -> int:
    """Every node of the cluster an agent on its own port, in one process, until SIGTERM or SIGINT."""
    import json

    from stoker import logs

    try:
        cluster = Cluster(load(args.scenario))
    except ScenarioError as exc:
        print(f"stoker: {exc}", file=sys.stderr)
        return 2
    host, _, first = args.listen.rpartition(":")
    ports = args.ports or [int(first) + i for i in range(cluster.spec.nodes)]
    if len(ports) != cluster.spec.nodes:
        print(f"stoker: {cluster.spec.nodes} nodes need {cluster.spec.nodes} ports", file=sys.stderr)
        return 2
    if args.targets:
        Path(args.targets).write_text(json.dumps(targets(cluster, ports, host or "127.0.0.1")))
    logs.configure("json", level=40)
    overrides: dict = {"agent": {"interval": args.interval}}
    if args.probe_interval:
        overrides["probes"] = {"interval": args.probe_interval}

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with tempfile.TemporaryDirectory(prefix="stoker-cluster-", dir=scratch()) as root:
            await serve(cluster, ports, root, overrides, stop, host or "127.0.0.1", args.started)

    asyncio.run(main())
    return 0


class ClusterDrive:
    """The cluster on a manual clock: each node's agent side (sources, verdicts) stepped in turn, a tick
    at a time, as `SimDrive` steps one node (sim/drive.py)."""

    def __init__(self, cluster: Cluster, root: str, interval: float = 1.0, cfg=None):
        from stoker.sim.drive import SimDrive

        self.cluster = cluster
        self.drives = []
        for i, sc in enumerate(cluster.scenarios):
            drive = SimDrive(sc, os.path.join(root, NODE_NAME.format(i)), interval, cfg=cfg)
            drive.sim.node.couple(cluster.coupling, i)
            self.drives.append(drive)

    def run(self, seconds: float) -> None:
        end = self.drives[0].sim.node.elapsed() + seconds
        while self.drives[0].sim.node.elapsed() < end - self.drives[0].interval / 2:
            for d in self.drives:
                d.step()

    def causes(self, t: float) -> list[str | None]:
        """Each node's verdict at the sample nearest scenario time `t`."""
        return [min(d.samples, key=lambda s: abs(s.t - t)).cause for d in self.drives]

    def judge(self):
        from stoker.sim.judge import judge

        return [judge(sc, d.samples, d.outcomes()) for sc, d in zip(self.cluster.scenarios, self.drives)]

    def close(self) -> None:
        for d in self.drives:
            d.close()
