"""The whole simulated XE9680: one scenario driving the fake NVML and the NICs."""

from __future__ import annotations

import asyncio
import time

from stoker.agent.platform import Platform
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.network import FakeEthtool, SimLinks, SimNetwork
from stoker.sim.node import SimNode

ADVANCE_EVERY = 0.25  # seconds between counter-file updates of the simulated kernel


class Simulation:
    def __init__(self, scenario: str, sysfs_root: str, rdma_ports: int = 8, clock=time.monotonic):
        self.node = SimNode(scenario, clock=clock)
        self.nvml = FakeNVML(self.node)
        self.network = SimNetwork(self.node, sysfs_root, rdma_ports)
        self.network.build()

    async def _drive(self) -> None:
        while True:
            await asyncio.to_thread(self.network.advance)
            await asyncio.sleep(ADVANCE_EVERY)

    def platform(self) -> Platform:
        return Platform(nvml=self.nvml, links=SimLinks(self.network),
                        open_ethtool=lambda ifname: FakeEthtool(self.network, ifname),
                        background=[self._drive])
