"""Scenarios of the simulated node, as data: TOML files of steps.

A step names the recorded GPU phase the eight simulated GPUs replay, how long
it lasts, and any mix of conditions: the network's, the storage's, the host's,
GPUs fallen off the bus, which job holds the GPUs (a new job id is a new job:
new PIDs, its own framebuffer; a new `launch` of the same job is a restart:
new PIDs, the same job id), the scheduler whose cgroups hold it, the level that
job reaches (a smaller model replays the recording scaled down), step-to-step
noise, whether the job hints its checkpoints, and the training steps it
reports (a step rate). Nodes that play a scenario side by side each run jobs of their
own (other ids) unless it shares them (`shared_jobs`). At the top level, the NVIDIA driver the fake NVML
answers as (`driver`), GPUs in MIG mode (`mig`), MPS (`mps`) and an in-place
driver upgrade (`driver_upgrade_at`). The built-in scenarios are such files
(`stoker/sim/data/scenarios/*.toml`); operators write their own to reproduce an
incident, and `stoker replay FILE` judges the verdicts against the file's
expectations. docs/SCENARIOS.md describes the format.

A scenario file is input from outside: it is read only if it is a regular file
(a FIFO blocked for ever, /dev/zero read until MemoryError), at most
`MAX_FILE_BYTES`, and everything in it is bounded (`MAX_*` below): nesting,
times, steps, expectations, restarts, and the job launches the simulated tree
holds a /proc/<pid> directory per GPU for. Whatever is wrong is one
ScenarioError naming the key, never a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from stoker.config import parse_toml
from stoker.sim import drivers
from stoker.sources.files import Refused, read_operator_file, shown

WARMUP = 10.0
"""Seconds of healthy training the built-in fault scenarios start with, so the job's level is known."""

GPU_PHASES = ("idle", "saturated", "input_starved", "pcie_bound", "checkpoint", "idle_after")
NETWORK = ("normal", "congested", "lossy", "port-down")
STORAGE = ("normal", "slow-read", "slow-write", "write-stall", "hung")
HOST = ("normal", "cpu-bound", "memory-pressure")
VERDICTS = ("none", "storage", "network", "checkpoint", "host", "peer")
CHECKPOINT_STATES = ("none", "in_progress", "stalled")
DEFAULT_JOB = "train"
MAX_FILE_BYTES = 256 << 10  # the largest built-in scenario takes 2.4 KB; TOML of this size parses within 3 s
MAX_SECONDS = 86400.0  # any time in a scenario (a step, an expectation's window, a restart): a day at most
MAX_STEPS = 1000
MAX_EXPECTATIONS = 1000
MAX_RESTARTS = 100
MAX_LAUNCHES = 64  # distinct (job, launch, scheduler): 8 /proc/<pid> directories each in the simulated tree
MAX_COUNT = 1_000_000  # an expected number of checkpoint outcomes
JOB_NAME = re.compile(r"[A-Za-z0-9._-]{0,64}")  # it names PIDs, cgroups and the job's labels


class ScenarioError(ValueError):
    """A scenario file that cannot be played; the message names the file and the key."""


@dataclass(frozen=True)
class Step:
    gpu_phase: str
    duration: float
    network: str = "normal"
    storage: str = "normal"
    lost_gpus: tuple[int, ...] = ()  # GPUs fallen off the bus (XID 79)
    host: str = "normal"
    job: str = DEFAULT_JOB  # "" while no job holds the GPUs
    level: float = 1.0  # the job's activity relative to the recording (a smaller model: below 1)
    noise: float = 0.0  # relative step-to-step jitter of the activity (standard deviation)
    hint: bool = False  # the job tells the agent about this checkpoint (start and end)
    profiling: str = "allowed"  # admin-only: GPM refused to the agent's user (a stock driver)
    launch: int = 0  # the job's launch: another number is a restart (new PIDs, same job id)
    scheduler: str = "slurm"  # whose cgroup holds the job's processes: slurm | kubernetes | none
    step_rate: float = 0.0  # training steps a second at the job's full speed, hinted to the agent; 0: none
    tokens_per_step: int = 0  # tokens of each hinted step (the global batch)

    @property
    def has_job(self) -> bool:
        return bool(self.job) and self.gpu_phase != "idle_after"


@dataclass(frozen=True)
class Expectation:
    """What the verdicts should be from `start` to `end` (scenario seconds), reached within `within`."""

    start: float
    end: float
    verdict: str | None = None  # a cause, or "none"
    checkpoint: str | None = None  # none | in_progress | stalled
    within: float = 3.0
    share: float = 1.0  # of the samples after `start + within` that must match
    never: tuple[str, ...] = ()  # verdicts that must not appear from `start` to `end`


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    description: str
    loop: bool = True
    fault_at: float = 0.0  # `stoker check --simulate` starts here
    expect: tuple[Expectation, ...] = ()
    outcomes: dict[str, int] = field(default_factory=dict)  # checkpoint outcomes expected by the end
    restarts: tuple[float, ...] = ()  # `stoker replay` restarts the agent at these scenario seconds
    state: str = "kept"  # what a restart finds of the agent's state file: kept (the package's), or lost
    shared_jobs: bool = False  # every node playing it runs the same jobs (one multi-node job), not its own
    driver: str = drivers.DEFAULT  # the NVIDIA driver branch the fake NVML answers as (sim/drivers.py)
    mig: tuple[int, ...] = ()  # GPUs in MIG mode, each with two 3g.40gb instances; the job's rank in the first
    mps: bool = False  # the job's ranks are MPS clients: the compute-process list shows the MPS server
    driver_upgrade_at: float | None = None  # the driver is replaced in place: NVML's session ends, and every
    # nvmlInit after answers LIB_RM_VERSION_MISMATCH

    @property
    def period(self) -> float:
        return sum(s.duration for s in self.steps)

    def at(self, t: float) -> tuple[Step, float]:
        """The step in force `t` seconds after start, and how far into it we are. Past the
        end a looping scenario starts over; any other holds its last step."""
        if self.loop:
            t %= self.period
        for step in self.steps:
            if t < step.duration:
                return step, t
            t -= step.duration
        last = self.steps[-1]
        return last, last.duration + t


def _check(value, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ScenarioError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _number(table: dict, key: str, where: str, default: float | None = None, low: float = 0.0,
            high: float = MAX_SECONDS) -> float:
    value = table.get(key, default)
    if value is None:
        raise ScenarioError(f"{where}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ScenarioError(f"{where}.{key}: expected a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _known(table: dict, allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(allowed))})")


STEP_KEYS = {"gpu", "seconds", "network", "storage", "host", "lost_gpus", "job", "level", "noise", "hint",
             "profiling", "launch", "scheduler", "step_rate", "tokens_per_step"}
STEP_DEFAULTS = ("job", "scheduler", "step_rate", "tokens_per_step")
"""Step keys a scenario may also set at its top level, for every step that does not say otherwise."""
PROFILING = ("allowed", "admin-only")
STATES = ("kept", "lost")
SCHEDULERS = ("slurm", "kubernetes", "none")
EXPECT_KEYS = {"from", "to", "verdict", "checkpoint", "within", "share", "never"}


def _step(table: dict, where: str, defaults: dict | None = None) -> Step:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: expected a table")
    _known(table, STEP_KEYS, where)
    table = {**(defaults or {}), **table}
    for key in ("launch", "tokens_per_step"):
        value = table.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise ScenarioError(f"{where}.{key}: expected a whole number from 0, got {value!r}")
    lost = table.get("lost_gpus", [])
    if not isinstance(lost, list) or not all(isinstance(i, int) and 0 <= i < 8 for i in lost):
        raise ScenarioError(f"{where}.lost_gpus: expected a list of GPU indexes 0-7")
    job = table.get("job", DEFAULT_JOB)
    if not isinstance(job, str) or not JOB_NAME.fullmatch(job):
        raise ScenarioError(f"{where}.job: expected up to 64 letters, digits, '.', '_' or '-'")
    if not isinstance(table.get("hint", False), bool):
        raise ScenarioError(f"{where}.hint: expected true or false")
    return Step(gpu_phase=_check(table.get("gpu"), GPU_PHASES, f"{where}.gpu"),
                duration=_number(table, "seconds", where, low=0.1),
                network=_check(table.get("network", "normal"), NETWORK, f"{where}.network"),
                storage=_check(table.get("storage", "normal"), STORAGE, f"{where}.storage"),
                host=_check(table.get("host", "normal"), HOST, f"{where}.host"),
                lost_gpus=tuple(lost), job=job,
                level=_number(table, "level", where, 1.0, 0.0, 1.0),
                noise=_number(table, "noise", where, 0.0, 0.0, 0.5),
                hint=table.get("hint", False),
                profiling=_check(table.get("profiling", "allowed"), PROFILING, f"{where}.profiling"),
                launch=table.get("launch", 0),
                scheduler=_check(table.get("scheduler", "slurm"), SCHEDULERS, f"{where}.scheduler"),
                step_rate=_number(table, "step_rate", where, 0.0, 0.0, 1000.0),
                tokens_per_step=table.get("tokens_per_step", 0))


def _expectation(table: dict, where: str) -> Expectation:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: expected a table")
    _known(table, EXPECT_KEYS, where)
    verdict = table.get("verdict")
    checkpoint = table.get("checkpoint")
    if verdict is None and checkpoint is None and not table.get("never"):
        raise ScenarioError(f"{where}: give `verdict`, `checkpoint` or `never`")
    never = table.get("never", [])
    if not isinstance(never, list):
        raise ScenarioError(f"{where}.never: expected a list")
    start = _number(table, "from", where)
    return Expectation(
        start=start, end=_number(table, "to", where, low=start),
        verdict=None if verdict is None else _check(verdict, VERDICTS, f"{where}.verdict"),
        checkpoint=None if checkpoint is None else _check(checkpoint, CHECKPOINT_STATES, f"{where}.checkpoint"),
        within=_number(table, "within", where, 3.0), share=_number(table, "share", where, 1.0, 0.0, 1.0),
        never=tuple(_check(v, VERDICTS, f"{where}.never") for v in never))


def parse(text: str, name: str) -> Scenario:
    """A scenario from TOML text; ScenarioError names the key that is wrong."""
    try:
        table = parse_toml(text)
    except ValueError as exc:
        raise ScenarioError(f"{name}: not valid TOML: {exc}") from None
    _known(table, {"description", "loop", "fault_at", "restarts", "state", "steps", "expect", "outcomes",
                   "shared_jobs", "driver", "mig", "mps", "driver_upgrade_at", *STEP_DEFAULTS}, name)
    defaults = {key: table[key] for key in STEP_DEFAULTS if key in table}
    steps = table.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ScenarioError(f"{name}: needs at least one [[steps]] table")
    expect = table.get("expect", [])
    for key, items, most in (("steps", steps, MAX_STEPS), ("expect", expect, MAX_EXPECTATIONS)):
        if not isinstance(items, list) or len(items) > most:
            raise ScenarioError(f"{name}.{key}: expected a list of at most {most} tables")
    outcomes = table.get("outcomes", {})
    if not isinstance(outcomes, dict) or not all(type(v) is int and 0 <= v <= MAX_COUNT for v in outcomes.values()):
        raise ScenarioError(f"{name}.outcomes: expected a table of outcome = count (0 to {MAX_COUNT})")
    loop = table.get("loop", False)
    if not isinstance(loop, bool):
        raise ScenarioError(f"{name}.loop: expected true or false")
    shared = table.get("shared_jobs", False)
    if not isinstance(shared, bool):
        raise ScenarioError(f"{name}.shared_jobs: expected true or false")
    mig = table.get("mig", [])
    if not isinstance(mig, list) or not all(isinstance(i, int) and 0 <= i < 8 for i in mig):
        raise ScenarioError(f"{name}.mig: expected a list of GPU indexes 0-7")
    if not isinstance(table.get("mps", False), bool):
        raise ScenarioError(f"{name}.mps: expected true or false")
    upgrade = table.get("driver_upgrade_at")
    restarts = table.get("restarts", [])
    if not isinstance(restarts, list) or len(restarts) > MAX_RESTARTS or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= MAX_SECONDS for r in restarts):
        raise ScenarioError(f"{name}.restarts: expected a list of at most {MAX_RESTARTS} scenario seconds "
                            f"(above 0, at most {MAX_SECONDS:g})")
    parsed = tuple(_step(s, f"{name}.steps[{i}]", defaults) for i, s in enumerate(steps))
    if len({(s.job, s.launch, s.scheduler) for s in parsed if s.has_job}) > MAX_LAUNCHES:
        raise ScenarioError(f"{name}.steps: more than {MAX_LAUNCHES} distinct job launches (job, launch, scheduler)")
    return Scenario(
        name=name,
        steps=parsed,
        description=str(table.get("description", "")),
        loop=loop,
        fault_at=_number(table, "fault_at", name, 0.0),
        expect=tuple(_expectation(e, f"{name}.expect[{i}]") for i, e in enumerate(expect)),
        outcomes=dict(outcomes), restarts=tuple(sorted(float(r) for r in restarts)),
        state=_check(table.get("state", "kept"), STATES, f"{name}.state"), shared_jobs=shared,
        driver=_check(table.get("driver", drivers.DEFAULT), tuple(drivers.PROFILES), f"{name}.driver"),
        mig=tuple(sorted(set(mig))), mps=table.get("mps", False),
        driver_upgrade_at=None if upgrade is None else _number(table, "driver_upgrade_at", name))


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("stoker.sim") / "data" / "scenarios").iterdir()
                  if p.name.endswith(".toml"))


DEFAULT = "cycle"


def get(name: str) -> Scenario:
    """A built-in scenario by name, or a scenario file by path."""
    if name.endswith(".toml") or "/" in name:
        return parse(read(name), Path(name).stem)
    if name not in builtin_names():
        raise ScenarioError(f"unknown scenario {name!r} (built in: {', '.join(builtin_names())}; or a .toml file)")
    return parse((resources.files("stoker.sim") / "data" / "scenarios" / f"{name}.toml").read_text(), name)


def read(path: str) -> str:
    """The text of a scenario file: a regular file (opened without blocking), at most `MAX_FILE_BYTES`, UTF-8."""
    try:
        return read_operator_file(path, MAX_FILE_BYTES)
    except Refused as exc:
        raise ScenarioError(f"{shown(path)}: {exc}") from None


def fault_start(name: str) -> float:
    """Seconds before a scenario's fault begins (`stoker check --simulate` skips them)."""
    return get(name).fault_at

