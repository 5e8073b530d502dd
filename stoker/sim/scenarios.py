"""Scenarios of the simulated node, as data: TOML files of steps.

A step names the recorded GPU phase the eight simulated GPUs replay, how long
it lasts, and any mix of conditions: the network's, the storage's, the host's,
GPUs fallen off the bus, which job holds the GPUs (a new job id is a new job:
new PIDs, its own framebuffer; a new `launch` of the same job is a restart:
new PIDs, the same job id), the scheduler whose cgroups hold it, the level that
job reaches (a smaller model replays the recording scaled down), step-to-step
noise, whether the job hints its checkpoints, and the training steps it
reports (a step rate). The built-in scenarios are such files
(`stoker/sim/data/scenarios/*.toml`); operators write their own to reproduce an
incident, and `stoker replay FILE` judges the verdicts against the file's
expectations. docs/SCENARIOS.md describes the format.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

WARMUP = 10.0
"""Seconds of healthy training the built-in fault scenarios start with, so the job's level is known."""

GPU_PHASES = ("idle", "saturated", "input_starved", "pcie_bound", "checkpoint", "idle_after")
NETWORK = ("normal", "congested", "lossy", "port-down")
STORAGE = ("normal", "slow-read", "slow-write", "write-stall", "hung")
HOST = ("normal", "cpu-bound", "memory-pressure")
VERDICTS = ("none", "storage", "network", "checkpoint", "host", "peer")
CHECKPOINT_STATES = ("none", "in_progress", "stalled")
DEFAULT_JOB = "train"


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
            high: float = float("inf")) -> float:
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
STEP_DEFAULTS = ("scheduler", "step_rate", "tokens_per_step")
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
    if not isinstance(job, str):
        raise ScenarioError(f"{where}.job: expected a string")
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
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{name}: not valid TOML: {exc}") from None
    _known(table, {"description", "loop", "fault_at", "restarts", "state", "steps", "expect", "outcomes",
                   *STEP_DEFAULTS}, name)
    defaults = {key: table[key] for key in STEP_DEFAULTS if key in table}
    steps = table.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ScenarioError(f"{name}: needs at least one [[steps]] table")
    outcomes = table.get("outcomes", {})
    if not isinstance(outcomes, dict) or not all(isinstance(v, int) for v in outcomes.values()):
        raise ScenarioError(f"{name}.outcomes: expected a table of outcome = count")
    loop = table.get("loop", False)
    if not isinstance(loop, bool):
        raise ScenarioError(f"{name}.loop: expected true or false")
    restarts = table.get("restarts", [])
    if not isinstance(restarts, list) or not all(isinstance(r, (int, float)) and r > 0 for r in restarts):
        raise ScenarioError(f"{name}.restarts: expected a list of positive scenario seconds")
    return Scenario(
        name=name,
        steps=tuple(_step(s, f"{name}.steps[{i}]", defaults) for i, s in enumerate(steps)),
        description=str(table.get("description", "")),
        loop=loop,
        fault_at=_number(table, "fault_at", name, 0.0),
        expect=tuple(_expectation(e, f"{name}.expect[{i}]") for i, e in enumerate(table.get("expect", []))),
        outcomes=dict(outcomes), restarts=tuple(sorted(float(r) for r in restarts)),
        state=_check(table.get("state", "kept"), STATES, f"{name}.state"))


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("stoker.sim") / "data" / "scenarios").iterdir()
                  if p.name.endswith(".toml"))


DEFAULT = "cycle"


def get(name: str) -> Scenario:
    """A built-in scenario by name, or a scenario file by path."""
    if name.endswith(".toml") or "/" in name:
        try:
            text = Path(name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"{name}: cannot read: {exc}") from None
        return parse(text, Path(name).stem)
    if name not in builtin_names():
        raise ScenarioError(f"unknown scenario {name!r} (built in: {', '.join(builtin_names())}; or a .toml file)")
    return parse((resources.files("stoker.sim") / "data" / "scenarios" / f"{name}.toml").read_text(), name)


def fault_start(name: str) -> float:
    """Seconds before a scenario's fault begins (`stoker check --simulate` skips them)."""
    return get(name).fault_at

