"""The whole simulated XE9680: one scenario driving the fake NVML, the NICs, the mounts and the host."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING

from stoker import logs
from stoker.agent.platform import Platform
from stoker.config import CheckpointConfig, Config, DetectConfig, ProbesConfig, ProbeTarget
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.host import SimHost
from stoker.sim.jobs import SimJobs
from stoker.sim.network import FakeEthtool, SimLinks, SimNetwork
from stoker.sim.node import SimNode
from stoker.sim.storage import SimStorage

if TYPE_CHECKING:
    from stoker.agent.runtime import Agent
    from stoker.detect.checkpoint import CheckpointTracker
    from stoker.detect.goodput import GoodputLedger

log = logs.get("sim")

ADVANCE_EVERY = 0.25  # seconds between counter-file updates of the simulated kernel, at most
ADVANCE_LEAD = 0.05  # with a slower agent: its files move once per cycle, this long before it
SIM_TOKEN = "simulated-node-hint-token"  # the hint API's token on the simulated node (a demo, not a secret)
CHECKPOINT_MOUNT = "/mnt/checkpoints"
# Thresholds shortened so that every built-in scenario reaches its verdict within 30 s; only those
# left at their defaults are shortened (a test or a demo can still ask for production values).
SHORTENED = {"probes": {"interval": 2.0, "timeout": 4.0}, "detect": {"probe_hung_seconds": 3.0},
             "checkpoint": {"stall_after": 8.0, "quiet_after": 3.0}}
DEFAULTS = {"probes": ProbesConfig(), "detect": DetectConfig(), "checkpoint": CheckpointConfig()}


class Simulation:
    """Lays out the simulated kernel under `root` (sys/, proc/, nas/) and keeps it moving."""

    def __init__(self, scenario, root: str, rdma_ports: int = 8, clock=time.monotonic, skip: float = 0.0,
                 name: str | None = None, held: bool = False):
        """`name`: the node's, which makes its jobs its own (`SimNode.job_key`); by default one drawn at
        random, so that nodes started side by side never report one job; "": the scenario's ids.
        `held`: the scenario's clock starts when the agent starts driving it (`SimNode.begin`)."""
        self.root = root
        self.name = secrets.token_hex(4) if name is None else name
        self.sysfs_root = os.path.join(root, "sys")
        self.procfs_root = os.path.join(root, "proc")
        self.token_file = os.path.join(root, "hint-token")
        self.hint_url_file = os.path.join(root, "hint-url")
        self.state_file = os.path.join(root, "state.json")  # /var/lib/stoker/state.json of the package
        self.node = SimNode(scenario, clock=clock, skip=skip, name=self.name, held=held)
        self.nvml = FakeNVML(self.node)
        self.network = SimNetwork(self.node, self.sysfs_root, rdma_ports)
        self.storage = SimStorage(self.node, self.procfs_root, os.path.join(root, "nas"), socket.gethostname())
        self.host = SimHost(self.node, self.procfs_root)
        self.jobs = SimJobs(self.node, self.procfs_root)  # the jobs' processes (cgroups) and their steps
        self.network.build()
        self.storage.build()
        self.host.build()
        self.jobs.build()
        self._hinting = False
        self._hints: list[str] = []  # start | end, for the job's hinted checkpoints, not yet delivered

    def configure(self, cfg: Config, keep_listen: bool = False) -> Config:
        """The configuration pointed at the simulated kernel, its mounts and their roles; the hint
        API on a free loopback port unless one was chosen (several simulated nodes fit on a machine):
        an address other than the default, or any with `keep_listen` (`--hint-listen`: a user who
        names the default address wants that one); the state file in the simulated tree unless one
        was chosen, as the package keeps one."""
        targets = tuple(ProbeTarget(m.mountpoint, m.probe_dir) for m in self.storage.mounts)
        token_file = cfg.checkpoint.token_file
        if not token_file:
            token_file = self.token_file
            with open(token_file, "w") as fh:
                fh.write(SIM_TOKEN + "\n")
        listen = cfg.checkpoint.listen
        if listen == CheckpointConfig().listen and not keep_listen:
            listen = "127.0.0.1:0"
        shortened = {section: dataclasses.replace(getattr(cfg, section), **{
            key: short for key, short in keys.items()
            if cfg.sim.shorten and getattr(getattr(cfg, section), key) == getattr(DEFAULTS[section], key)})
            for section, keys in SHORTENED.items()}
        return dataclasses.replace(
            cfg,
            agent=dataclasses.replace(cfg.agent, sysfs_root=self.sysfs_root, procfs_root=self.procfs_root,
                                      state_file=cfg.agent.state_file or self.state_file),
            nfs=dataclasses.replace(cfg.nfs, data_mounts=("/mnt/data",), checkpoint_mounts=(CHECKPOINT_MOUNT,)),
            probes=dataclasses.replace(shortened["probes"], targets=cfg.probes.targets or targets),
            detect=shortened["detect"],
            checkpoint=dataclasses.replace(shortened["checkpoint"], token_file=token_file, listen=listen))

    def advance(self) -> None:
        self.network.advance()
        self.storage.advance()
        self.host.advance()
        self.jobs.advance()
        hinting = self.node.step().hint
        if hinting != self._hinting:
            self._hints.append("start" if hinting else "end")
            self._hinting = hinting

    def deliver_hints(self, tracker: CheckpointTracker, ledger: GoodputLedger | None = None) -> None:
        """What the simulated job tells the agent about its checkpoints (and, with `ledger`, its
        steps), as `stoker.hints` would."""
        if ledger is not None:
            self.jobs.deliver(ledger)
        hints, self._hints = self._hints, []
        for hint in hints:
            if hint == "start":
                tracker.hint_start(CHECKPOINT_MOUNT)
            elif tracker.mounts.get(CHECKPOINT_MOUNT) and tracker.mounts[CHECKPOINT_MOUNT].active:
                tracker.hint_end(CHECKPOINT_MOUNT, "completed")

    async def _drive(self, agent: Agent) -> None:
        self.node.begin()
        if agent.hint_url:
            with open(self.hint_url_file, "w") as fh:
                fh.write(agent.hint_url + "\n")
        log.info("simulated node", scenario=self.node.scenario.name, name=self.name or None, root=self.root,
                 token_file=agent.config.checkpoint.token_file, hint_url=agent.hint_url)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.to_thread(self.advance)
            if agent.verdicts is not None:
                self.deliver_hints(agent.verdicts.checkpoints, agent.verdicts.goodput)
            await asyncio.sleep(self.pause(agent, loop.time()))

    @staticmethod
    def pause(agent: Agent, now: float) -> float:
        """Seconds until the kernel's files next move. The agent reads them once per cycle, so
        they move once per cycle, `ADVANCE_LEAD` before it: what it reads is at most that old
        (it was up to `ADVANCE_EVERY` when they moved every `ADVANCE_EVERY`), for a quarter of the
        writes at 1 s and a twentieth at 5 s. An agent faster than `ADVANCE_EVERY` reads them
        more often than they move, as before."""
        interval = agent.config.agent.interval
        due = agent.supervisor.next_due()
        if interval <= ADVANCE_EVERY or due is None:
            return ADVANCE_EVERY
        target = due - ADVANCE_LEAD
        while target <= now:  # that cycle's files have moved: the next one's
            target += interval
        return target - now

    def platform(self) -> Platform:
        return Platform(nvml=self.nvml, links=SimLinks(self.network),
                        open_ethtool=lambda ifname: FakeEthtool(self.network, ifname),
                        background=[self._drive])
