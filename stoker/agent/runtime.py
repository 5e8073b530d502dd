"""The agent: builds collectors from the configuration, serves, stops cleanly.

SIGTERM/SIGINT set the stop event; collectors are cancelled and closed with a
bounded wait, so the process exits within seconds even if a driver call hangs.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from stoker import __version__, logs
from stoker.agent.collector import Collector
from stoker.agent.gpu import GpuCollector
from stoker.agent.supervisor import Supervisor
from stoker.config import Config, parse_listen
from stoker.exporters.exposition import Exposition
from stoker.exporters.http import bound_port, make_app, serve

log = logs.get("agent")

SHUTDOWN_GRACE = 3.0


class Agent:
    def __init__(self, config: Config, nvml: Any):
        self.config = config
        self.exposition = Exposition()
        self.collectors: list[Collector] = []
        self.gpu: GpuCollector | None = None
        if config.gpu.enabled:
            self.gpu = GpuCollector(nvml, config.agent.interval, config.gpu.slow_interval, config.gpu.call_timeout)
            self.collectors.append(self.gpu)
        self.supervisor = Supervisor(self.collectors, self.exposition, self._build_labels)
        self.stop_event = asyncio.Event()
        self.port: int | None = None
        self._runner = None

    def _build_labels(self) -> dict[str, str]:
        source = self.gpu.source if self.gpu else None
        return {"version": __version__,
                "nvml_version": source.nvml_version if source else "",
                "driver_version": source.driver_version if source else ""}

    async def start(self) -> None:
        host, port = parse_listen(self.config.agent.listen)
        app = make_app(self.exposition, self.supervisor.stale)
        self._runner = await serve(app, host, port)
        self.port = bound_port(self._runner)
        await self.supervisor.start()
        log.info("stoker started", version=__version__, listen=f"{host}:{self.port}",
                 collectors=[c.name for c in self.collectors], interval=self.config.agent.interval)

    async def stop(self) -> None:
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
