"""Expected inventory: how many GPUs and RDMA ports the node should have, and how many it has.

StokerGpuLost needs a GPU that was seen: a node that boots with 7 of its 8 GPUs
(one that failed PCIe training after a reset) or 7 of its 8 RoCE ports (a NIC
that did not come up) shows nothing wrong, and its jobs run short of a rank or
a rail. So the agent states what the node should have: the number in
`[inventory]`, else the most it has shown, learned at its first start and kept
in the state file (`inventory` field, beside the job's state: detect/state.py),
so that a node restarted or rebooted short of a device is compared with what
it had before. `stoker_inventory_present < stoker_inventory_expected` is
StokerInventoryMissing, and a problem for `stoker check`.

Present is what the collectors enumerate: the GPUs NVML counts (a GPU lost
after it was seen is still counted, and StokerGpuLost says so), the ports
under class/infiniband whatever their state (StokerRdmaPortDown covers a port
that is down). The families are read with the agent's own metrics, from the
collectors' last snapshots: no extra sampling.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

from stoker import logs
from stoker.agent.verdicts import STATE_TIMEOUT
from stoker.agent.worker import CollectorError, Worker
from stoker.config import InventoryConfig
from stoker.detect.state import read_fields, write_fields

log = logs.get("inventory")

FIELD = "inventory"
KEEP_EVERY = 30.0
"""Seconds between checks for a count to keep: a higher count is kept at most this late, and
the first start's counts once the collectors' first cycles are done."""


class Inventory:
    def __init__(self, config: InventoryConfig, present: dict[str, Callable[[], int | None]],
                 state_file: str = "", read_only: bool = False):
        """`present`: for each kind whose collector runs ("gpu", "rdma_port"), how many it found in
        its last cycle (None before one). `read_only`: `stoker check` reads the service's file and
        never writes it."""
        self.present = present
        self.state_file = state_file
        self.read_only = read_only
        self.configure(config)
        self.learned: dict[str, int] = {}  # the most each kind has shown: the state file's, then this run's
        self._kept: dict[str, int] = {}  # as the state file holds them
        self._files = Worker("inventory")  # the state file's reads and writes, with a deadline (daemon threads)

    def configure(self, config: InventoryConfig) -> None:
        self.configured = {"gpu": config.gpus, "rdma_port": config.rdma_ports}

    def counts(self) -> list[tuple[str, int | None, int | None]]:
        """(kind, expected, present) for each kind watched; None: not known yet."""
        out = []
        for kind, count in self.present.items():
            present = count()
            if present is not None and present > self.learned.get(kind, 0):
                self.learned[kind] = present
            out.append((kind, self.configured[kind] or self.learned.get(kind), present))
        return out

    def why(self, kind: str) -> str:
        """Where the expected count comes from, for the operator."""
        if self.configured[kind]:
            return "[inventory] in the configuration"
        return "the most this node has shown" + (f", kept in {self.state_file}" if self.state_file else "")

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The registry protocol: rendered with the agent's own metrics."""
        expected = GaugeMetricFamily(
            "stoker_inventory_expected", "How many of that kind the node should have: [inventory] in the "
            "configuration, else the most it has shown (kept in the state file).", labels=["kind"])
        present = GaugeMetricFamily(
            "stoker_inventory_present", "How many of that kind the agent finds: GPUs NVML enumerates, "
            "RDMA ports under class/infiniband.", labels=["kind"])
        for kind, want, have in self.counts():
            if want is not None:
                expected.add_metric([kind], want)
            if have is not None:
                present.add_metric([kind], have)
        return [expected, present]

    def load(self) -> None:
        """What the state file kept (worker thread); a missing or unreadable one keeps nothing."""
        if not self.state_file:
            return
        try:
            kept = read_fields(self.state_file).get(FIELD) or {}
            kept = {k: int(v) for k, v in kept.items() if k in self.configured and isinstance(v, int) and v > 0}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("kept inventory unreadable; learning it afresh", path=self.state_file, error=str(exc))
            return
        self._kept = dict(kept)
        for kind, n in kept.items():
            self.learned[kind] = max(n, self.learned.get(kind, 0))

    def keep(self) -> None:
        """Write what was learned, if it grew (worker thread)."""
        self.counts()
        learned = dict(self.learned)
        if self.read_only or not self.state_file or learned == self._kept:
            return
        try:
            write_fields(self.state_file, {FIELD: learned})
        except OSError as exc:
            log.warning("cannot keep the inventory", path=self.state_file, error=str(exc))
            return
        log.info("inventory kept", path=self.state_file, **learned)
        self._kept = learned

    async def run(self, every: float = KEEP_EVERY) -> None:
        """The agent's background task: load, then keep what grows. The file is read and written
        as the verdicts' state is, in the sampling lane's daemon thread, given up after STATE_TIMEOUT:
        in asyncio's default executor a read hung on a dead NFS server held up the process's exit for
        good, after `stoker stopped` (asyncio.run waits for the executor's threads)."""
        await self._in_lane(self.load, "kept inventory unreadable; learning it afresh")
        while True:
            await asyncio.sleep(every)
            await self._in_lane(self.keep, "cannot keep the inventory")

    async def _in_lane(self, job: Callable[[], None], failure: str) -> None:
        try:
            await self._files.call(job, timeout=STATE_TIMEOUT)
        except CollectorError as exc:  # past the deadline, or the last call still hung
            log.warning(failure, path=self.state_file, error=str(exc))
