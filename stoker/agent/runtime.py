"""The agent: builds collectors from the configuration, serves, stops cleanly.

SIGTERM/SIGINT set the stop event; collectors are cancelled and closed with a
bounded wait, so the process exits within seconds even if a driver call hangs.
"""

from __future__ import annotations

import asyncio
import signal

from stoker import __version__, logs
from stoker.agent.collector import Collector
from stoker.agent.gpu import gpu_collector
from stoker.agent.netdev import NetdevCollector, watched_interfaces
from stoker.agent.platform import Platform
from stoker.agent.probes import ProbeCollector
from stoker.agent.sourced import SourceCollector
from stoker.agent.supervisor import Supervisor
from stoker.config import Config, parse_listen
from stoker.exporters import nfs as nfs_families
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import Exposition
from stoker.exporters.http import bound_port, make_app, serve
from stoker.sources.netdev import EthtoolReader
from stoker.sources.nfs import NfsSource
from stoker.sources.rdma import RdmaSource

log = logs.get("agent")

SHUTDOWN_GRACE = 3.0


class Agent:
    def __init__(self, config: Config, platform: Platform):
        self.config = config
        self.platform = platform
        self.exposition = Exposition()
        self.collectors: list[Collector] = []
        interval = config.agent.interval
        self.gpu: SourceCollector | None = None
        if config.gpu.enabled:
            self.gpu = gpu_collector(platform.nvml, interval, config.gpu.slow_interval, config.gpu.call_timeout)
            self.collectors.append(self.gpu)
        self.rdma: SourceCollector | None = None
        if config.rdma.enabled:
            source = RdmaSource(config.agent.sysfs_root)
            self.rdma = SourceCollector("rdma", interval, source.sample, rdma_families.families,
                                        config.rdma.call_timeout)
            self.collectors.append(self.rdma)
        if config.netdev.enabled:
            wanted = watched_interfaces(self._rdma_interfaces, config.netdev.include, config.netdev.exclude)
            self.collectors.append(NetdevCollector(interval, wanted, platform.links,
                                                   EthtoolReader(platform.open_ethtool), config.netdev.call_timeout))
        if config.nfs.enabled:
            source = NfsSource(config.agent.procfs_root, config.nfs.operations, config.nfs.roles())
            self.collectors.append(SourceCollector("nfs", interval, source.sample, nfs_families.families,
                                                   config.nfs.call_timeout))
        if config.probes.targets:
            self.collectors.append(ProbeCollector(interval, config.probes))
        self.supervisor = Supervisor(self.collectors, self.exposition, self._build_labels)
        self.stop_event = asyncio.Event()
        self.port: int | None = None
        self._runner = None
        self._background: list[asyncio.Task] = []

    def _rdma_interfaces(self) -> list[str]:
        snapshot = self.rdma.snapshot if self.rdma else None
        return [p.interface for p in snapshot.ports] if snapshot else []

    def _build_labels(self) -> dict[str, str]:
        source = self.gpu.source if self.gpu else None
        return {"version": __version__,
                "nvml_version": source.nvml_version if source else "",
                "driver_version": source.driver_version if source else ""}

    async def start(self) -> None:
        host, port = parse_listen(self.config.agent.listen)
        self._background = [asyncio.create_task(job()) for job in self.platform.background]
        app = make_app(self.exposition, self.supervisor.stale)
        self._runner = await serve(app, host, port)
        self.port = bound_port(self._runner)
        await self.supervisor.start()
        log.info("stoker started", version=__version__, listen=f"{host}:{self.port}",
                 collectors=[c.name for c in self.collectors], interval=self.config.agent.interval)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        try:
            await asyncio.wait_for(self.supervisor.stop(), SHUTDOWN_GRACE)
        except asyncio.TimeoutError:
            log.warning("collectors did not close in time; exiting anyway")
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("stoker stopped")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.start()
        try:
            await self.stop_event.wait()
        finally:
            await self.stop()
