"""The simulated XE9680: 8 GPUs held by one job at a time, walking through a scenario."""

from __future__ import annotations

import random
import statistics
import time
import zlib
from functools import lru_cache
from typing import Callable

from stoker.sim import scenarios, trace

GPU_COUNT = 8
ROW_STAGGER = 7  # rows between neighbouring GPUs, so they move alike but not in lockstep
ACTIVITY = ("gpm_sm_util", "gpm_sm_occupancy", "gpm_any_tensor_util", "gpm_dram_bw_util", "gpm_graphics_util",
            "util_gpu", "gpm_pcie_tx_per_sec", "gpm_pcie_rx_per_sec")
PERCENT = {"gpm_sm_util", "gpm_sm_occupancy", "gpm_any_tensor_util", "gpm_dram_bw_util", "gpm_graphics_util",
           "util_gpu"}
IDLE_POWER_W = 121.0  # the recorded H200 with nothing running
_RNG = random.Random(11)
NOISE = tuple(_RNG.gauss(0.0, 1.0) for _ in range(4093))
"""One draw per second, the same on every GPU: a job's step time jitters for all its ranks at once."""


NCCL_SMS = 16
"""SMs a waiting rank's NCCL kernel keeps on an 8-NIC node (one CTA per channel, each on an SM of its own:
NVIDIA/nccl#689)."""
H100_SMS = 132
WAIT_POWER_ABOVE_IDLE_W = 20.0
"""An H100 spinning in a hung all-gather drew 152 W at 100% utilization beside ones at 0% drawing 129-137 W
(NVIDIA/nccl#1550)."""
STILL = ("mem_used_mib", "sm_mhz", "clk_reasons", "t", "sample_us")
"""Columns a wait does not change: the job's memory, the clocks."""


@lru_cache(maxsize=1)
def saturated_sm() -> float:
    """SM activity of the recording's saturated phase: a job's full speed."""
    return statistics.median(r["gpm_sm_util"] for r in trace.phases()["saturated"].rows)


@lru_cache(maxsize=1)
def phase_speed() -> dict[str, float]:
    """Each recorded phase's speed: its SM activity against the saturated phase's."""
    out = {name: min(1.0, statistics.median(r["gpm_sm_util"] for r in p.rows) / saturated_sm())
           for name, p in trace.phases().items()}
    out["saturated"] = 1.0
    return out


def waiting_row(base: dict[str, float]) -> dict[str, float]:
    """What a GPU spinning in an NCCL collective reads: the kernel is always resident, a few SMs hold it."""
    row = {k: (v if k in STILL else 0.0) for k, v in base.items()}
    row.update(util_gpu=100.0, gpm_sm_util=100.0 * NCCL_SMS / H100_SMS, gpm_graphics_util=100.0 * NCCL_SMS / H100_SMS,
               gpm_sm_occupancy=100.0 * NCCL_SMS / H100_SMS * 640 / 2048, gpm_dram_bw_util=0.5)
    row["power_w"] = IDLE_POWER_W + WAIT_POWER_ABOVE_IDLE_W
    return row


def blend(row: dict[str, float], wait: dict[str, float], share: float) -> dict[str, float]:
    """A sampling window `share` of which the GPU waited in a collective and the rest computed."""
    return {k: (v if k in STILL else (1.0 - share) * v + share * wait[k]) for k, v in row.items()}


def data_wait(step: scenarios.Step) -> float:
    """Of each step of the job, the share its input pipeline makes it wait for its batch: the input-bound
    slowness of an input-starved phase (a fault of the network slows the collectives, not the loader)."""
    if not step.has_job or step.gpu_phase != "input_starved" or step.network != "normal":
        return 0.0
    return 1.0 - phase_speed()["input_starved"]


class SimNode:
    def __init__(self, scenario: str | scenarios.Scenario = scenarios.DEFAULT, gpu_count: int = GPU_COUNT,
                 clock: Callable[[], float] = time.monotonic, skip: float = 0.0, name: str = "",
                 held: bool = False):
        """`skip` seconds of the scenario are taken as already past (`stoker check` starts in the fault).
        `name`: what makes this node's jobs its own (`job_key`); "": the scenario's jobs as they are.
        `held`: the scenario stands still at `skip` until `begin()`, so that the seconds an agent takes
        to start (imports, on a loaded machine several) are not scenario time: a GPU lost at second 10
        is lost while the agent watches, as the scenario means, however slowly it started."""
        self.scenario = scenarios.get(scenario) if isinstance(scenario, str) else scenario
        self.gpu_count = gpu_count
        self.name = name
        self.clock = clock
        self._skip = skip
        self.started: float | None = None if held else clock() - skip
        self.coupling = None  # a cluster's (sim/cluster.py): this node's job spans others
        self.index = 0  # its node in the cluster

    def begin(self) -> None:
        """Start the scenario's clock, if held and not yet started."""
        if self.started is None:
            self.started = self.clock() - self._skip

    def couple(self, coupling, index: int) -> None:
        """Make this node one of a simulated cluster's: its GPUs wait for the slowest node of its job."""
        self.coupling, self.index = coupling, index

    def elapsed(self) -> float:
        return self._skip if self.started is None else self.clock() - self.started

    def gpu_phase(self, t: float | None = None) -> str:
        step, _ = self.scenario.at(self.elapsed() if t is None else t)
        return step.gpu_phase

    def step(self) -> scenarios.Step:
        """The scenario step in force now."""
        return self.scenario.at(self.elapsed())[0]

    def lost_gpus(self) -> tuple[int, ...]:
        return self.step().lost_gpus

    def job(self) -> str:
        """The job holding the GPUs now; "" when none does."""
        step = self.step()
        return step.job if step.has_job else ""

    def job_key(self, job: str) -> str:
        """What a job's ids on this node (Slurm job id, pod UID, the name it hints) are made from:
        its name and the node's, so that nodes started side by side run jobs of their own (a
        fleet of them is not one job across every node), unless the scenario shares its jobs
        (`shared_jobs`: one multi-node job, the same ids on every node that plays it)."""
        if not job or not self.name or self.scenario.shared_jobs:
            return job
        return f"{job}@{self.name}"

    def launch(self) -> int:
        """The launch of the job holding the GPUs now: another one is a restart (new processes)."""
        return self.step().launch

    def gpu_row(self, gpu: int, t: float) -> dict[str, float]:
        step, into = self.scenario.at(t)
        row = trace.row_at(trace.phases()[step.gpu_phase], into, gpu * ROW_STAGGER)
        waiting = self.coupling.waiting(self.index, t) if self.coupling is not None else 0.0
        factor = step.level
        if step.noise:
            factor *= max(0.0, 1.0 + step.noise * NOISE[int(t) % len(NOISE)])
        if factor != 1.0:
            out = dict(row)
            for column in ACTIVITY:
                value = row[column] * factor
                out[column] = min(100.0, value) if column in PERCENT else value
            out["power_w"] = IDLE_POWER_W + max(0.0, row["power_w"] - IDLE_POWER_W) * min(factor, 1.0)
            row = out
        if waiting:
            row = blend(row, waiting_row(row), waiting)
        return row

    def fabric(self, t: float) -> bool:
        """The job's collectives cross the RDMA fabric: as a node of a job that spans nodes, as every
        single scenario's node is; in a cluster, only where its job spans nodes."""
        return self.coupling is None or self.coupling.fabric(self.index, t)


def job_pid(job: str, gpu: int, launch: int = 0) -> int:
    """The PID of a job's rank on a GPU: a new job id gives new PIDs, as does a new launch of the same job."""
    key = job if not launch else f"{job}#{launch}"
    return 10_000 + zlib.crc32(key.encode()) % 3_000_000 + gpu


def job_memory_mib(job: str) -> float:
    """Framebuffer a job holds on each GPU beyond the recorded context: 40-70 GiB, as 7B-70B training does."""
    return 0.0 if not job else 40_960.0 + zlib.crc32(job.encode()) % 30_720


class Ticker:
    """Simulated time for one model of the node (NICs, mounts): now, and how long since its last tick."""

    def __init__(self, node: SimNode):
        self.node = node
        self._last: float | None = None

    def tick(self) -> tuple[float, float]:
        t = self.node.elapsed()
        dt = 0.0 if self._last is None else max(0.0, t - self._last)
        self._last = t
        return t, dt
