"""The whole simulated XE9680: one scenario driving the fake NVML and the NICs."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time

from stoker.config import Config, ProbeTarget

from stoker.agent.platform import Platform
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.network import FakeEthtool, SimLinks, SimNetwork
from stoker.sim.node import SimNode
from stoker.sim.storage import SimStorage

ADVANCE_EVERY = 0.25  # seconds between counter-file updates of the simulated kernel
SIM_TOKEN = "simulated-node-hint-token"  # the hint API's token on the simulated node (a demo, not a secret)


class Simulation:
    """Lays out the simulated kernel under `root` (sys/, proc/, nas/) and keeps it moving."""

    def __init__(self, scenario, root: str, rdma_ports: int = 8, clock=time.monotonic, skip: float = 0.0):
        self.root = root
        self.sysfs_root = os.path.join(root, "sys")
        self.procfs_root = os.path.join(root, "proc")
        self.node = SimNode(scenario, clock=clock, skip=skip)
        self.nvml = FakeNVML(self.node)
        self.network = SimNetwork(self.node, self.sysfs_root, rdma_ports)
        self.storage = SimStorage(self.node, self.procfs_root, os.path.join(root, "nas"), socket.gethostname())
        self.network.build()
        self.storage.build()

    def configure(self, cfg: Config) -> Config:
        """The configuration pointed at the simulated kernel, its mounts and their roles, with the
        time thresholds shortened so that every scenario reaches its verdict within 30 s
        (README: "The simulated node")."""
        targets = tuple(ProbeTarget(m.mountpoint, m.probe_dir) for m in self.storage.mounts)
        token_file = cfg.checkpoint.token_file
        if not token_file:
            token_file = os.path.join(self.root, "hint-token")
            with open(token_file, "w") as fh:
                fh.write(SIM_TOKEN + "\n")
        return dataclasses.replace(
            cfg,
            agent=dataclasses.replace(cfg.agent, sysfs_root=self.sysfs_root, procfs_root=self.procfs_root),
            nfs=dataclasses.replace(cfg.nfs, data_mounts=("/mnt/data",), checkpoint_mounts=("/mnt/checkpoints",)),
            probes=dataclasses.replace(cfg.probes, targets=cfg.probes.targets or targets,
                                       interval=min(cfg.probes.interval, 2.0), timeout=min(cfg.probes.timeout, 4.0)),
            detect=dataclasses.replace(cfg.detect, probe_hung_seconds=min(cfg.detect.probe_hung_seconds, 3.0)),
            checkpoint=dataclasses.replace(cfg.checkpoint, token_file=token_file,
                                           stall_after=min(cfg.checkpoint.stall_after, 8.0),
                                           quiet_after=min(cfg.checkpoint.quiet_after, 3.0)))

    def advance(self) -> None:
        self.network.advance()
        self.storage.advance()

    async def _drive(self) -> None:
        while True:
            await asyncio.to_thread(self.advance)
            await asyncio.sleep(ADVANCE_EVERY)

    def platform(self) -> Platform:
        return Platform(nvml=self.nvml, links=SimLinks(self.network),
                        open_ethtool=lambda ifname: FakeEthtool(self.network, ifname),
                        background=[self._drive])
