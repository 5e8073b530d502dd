"""The netdev collector: link state on the loop (netlink), ethtool counters in a worker thread."""

from __future__ import annotations

import time
from typing import Any, Callable

from stoker.agent.collector import Collector
from stoker.agent.worker import Worker, within
from stoker.exporters import netdev as netdev_families
from stoker.sources.files import error_reason
from stoker.sources.netdev import EthtoolReader, NetSnapshot, snapshot


class NetdevCollector(Collector):
    name = "netdev"

    def __init__(self, interval: float, wanted: Callable[[], list[str]], links: Any,
                 reader: EthtoolReader, timeout: float):
        self.interval = interval
        self.timeout = timeout
        self.snapshot: NetSnapshot | None = None
        self.sampled_at: float | None = None  # monotonic: when the snapshot was taken
        self.wanted = wanted
        self._links = links
        self._reader = reader
        self._worker = Worker(self.name)

    async def cycle(self) -> list[str]:
        """The ethtool counters first: the call leaves with the other collectors' calls of this tick, in
        one batch. The link state comes after, on the loop, while the sampling thread is idle (before,
        the netlink round trip ran beside the batch, and the two threads traded the GIL)."""
        names = self.wanted()
        problems: list[str] = []
        stats, read_problems = await self._worker.call(self._reader.read, names, timeout=self.timeout)
        try:
            states = await within(self._links.operstates(), self.timeout)
        except Exception as exc:  # netlink trouble costs the link state, not the counters
            states = None
            problems.append(f"netlink_{error_reason(exc)}")
        self.snapshot = snapshot(names, states, stats, problems + read_problems)
        self.sampled_at = time.monotonic()
        return self.snapshot.problems

    def families(self):
        return netdev_families.families(self.snapshot) if self.snapshot is not None else []

    async def close(self) -> None:
        await self._links.close()
        self._worker.close()


def watched_interfaces(rdma_interfaces: Callable[[], list[str]], include: tuple[str, ...],
                       exclude: tuple[str, ...]) -> Callable[[], list[str]]:
    """The netdevs behind the RDMA ports, plus `include`, minus `exclude`."""
    def wanted() -> list[str]:
        names = dict.fromkeys([*rdma_interfaces(), *include])
        return [n for n in names if n and n not in exclude]
    return wanted
