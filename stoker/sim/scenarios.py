"""Scenarios of the simulated node: which recorded GPU phase plays when.

A scenario is a loop of steps; each step names the recorded GPU phase the
eight simulated GPUs replay, the condition of the network, and how long it
lasts. A starved step replays `input_starved`: the GPUs wait, whatever for.
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.sim import trace

WARMUP = 10.0  # seconds of healthy training before a scenario's fault, so the job's level is known


@dataclass(frozen=True)
class Step:
    gpu_phase: str
    duration: float
    network: str = "normal"  # normal | congested | lossy | port-down
    storage: str = "normal"  # normal | slow-read | slow-write | write-stall | hung
    lost_gpus: tuple[int, ...] = ()  # GPUs fallen off the bus (XID 79)


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    description: str

    @property
    def period(self) -> float:
        return sum(s.duration for s in self.steps)

    def at(self, t: float) -> tuple[Step, float]:
        """The step in force `t` seconds after start, and how far into it we are."""
        t %= self.period
        for step in self.steps:
            if t < step.duration:
                return step, t
            t -= step.duration
        return self.steps[-1], self.steps[-1].duration


def _recorded() -> tuple[Step, ...]:
    return tuple(Step(p.name, p.duration) for p in trace.phases().values())


def _after_warmup(*steps: Step) -> tuple[Step, ...]:
    return (Step("saturated", WARMUP),) + steps


SCENARIOS = {
    "cycle": lambda: Scenario("cycle", _recorded() + (
        Step("input_starved", 15.0, network="congested"),
        Step("input_starved", 15.0, network="lossy"),
        Step("input_starved", 15.0, network="port-down"),
        Step("input_starved", 15.0, storage="slow-read"),
        Step("checkpoint", 15.0, storage="slow-write"),
        Step("input_starved", 15.0, storage="hung"),
        Step("checkpoint", 15.0, storage="write-stall"),
        Step("saturated", 15.0, lost_gpus=(5,))),
        "walks through every recorded phase, then the network faults, in turn"),
    "healthy": lambda: Scenario("healthy", (Step("saturated", 60.0),), "a training job keeping the GPUs busy"),
    "network-congested": lambda: Scenario("network-congested", _after_warmup(
        Step("input_starved", 600.0, network="congested")),
        "ECN marks, CNPs and PFC pauses rise on every rail while SM activity falls"),
    "network-lossy": lambda: Scenario("network-lossy", _after_warmup(
        Step("input_starved", 600.0, network="lossy")),
        "out-of-sequence packets, local ACK timeouts and retransmissions rise"),
    "port-down": lambda: Scenario("port-down", _after_warmup(
        Step("input_starved", 600.0, network="port-down")),
        "rail 3's RoCE port goes down"),
    "storage-starved": lambda: Scenario("storage-starved", _after_warmup(
        Step("input_starved", 600.0, storage="slow-read")),
        "NFS READ latency and queueing rise on the data mount while SM activity falls"),
    "checkpoint": lambda: Scenario("checkpoint", _after_warmup(
        Step("checkpoint", 13.0), Step("saturated", 600.0)),
        "a checkpoint written to the NAS at full speed, then training resumes"),
    "checkpoint-slow": lambda: Scenario("checkpoint-slow", _after_warmup(
        Step("checkpoint", 600.0, storage="slow-write")),
        "a checkpoint whose writes crawl: the NAS takes 4 MB/s"),
    "checkpoint-stall": lambda: Scenario("checkpoint-stall", _after_warmup(
        Step("checkpoint", 4.0), Step("checkpoint", 600.0, storage="write-stall")),
        "a checkpoint starts, then no byte reaches the NAS while the GPUs wait"),
    "host-starved": lambda: Scenario("host-starved", _after_warmup(
        Step("input_starved", 600.0)),
        "the input pipeline cannot keep up (CPU-bound data loading): network and storage are fine"),
    "gpu-lost": lambda: Scenario("gpu-lost", _after_warmup(
        Step("saturated", 600.0, lost_gpus=(5,))),
        "GPU 5 falls off the bus (XID 79); the other seven carry on in this simulation"),
    "nas-hang": lambda: Scenario("nas-hang", _after_warmup(
        Step("input_starved", 600.0, storage="hung")),
        "the NAS stops answering: no RPC completes, probes block"),
}

DEFAULT = "cycle"


def fault_start(name: str) -> float:
    """Seconds before a scenario's fault begins: its warm-up, when it has one."""
    steps = get(name).steps
    return WARMUP if len(steps) > 1 and steps[0] == Step("saturated", WARMUP) and name != "cycle" else 0.0


def get(name: str) -> Scenario:
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise ValueError(f"unknown scenario {name!r} (known: {', '.join(sorted(SCENARIOS))})") from None
