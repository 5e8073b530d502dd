"""The agent: builds collectors from the configuration, serves, stops cleanly.

SIGTERM/SIGINT set the stop event; collectors are cancelled and closed with a
bounded wait, so the process exits within seconds even if a driver call hangs.
A collector that cannot go on in this process (the NVIDIA driver replaced under
it) sets the stop event too, with the exit status `run` returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from typing import Callable

from stoker import __version__, logs
from stoker.agent import systemd
from stoker.agent.collector import Collector
from stoker.agent.gpu import EXIT_DRIVER_REPLACED, gpu_collector
from stoker.agent.jobs import JobAttributor
from stoker.agent.netdev import NetdevCollector, watched_interfaces
from stoker.agent.platform import Platform
from stoker.agent.probes import ProbeCollector
from stoker.agent.sourced import SourceCollector
from stoker.agent.supervisor import Supervisor
from stoker.agent.verdicts import VerdictCollector
from stoker.agent.worker import within
from stoker.config import Config, ConfigError, parse_listen, read_text
from stoker.detect import evidence
from stoker.detect.view import NodeView
from stoker.exporters import nfs as nfs_families
from stoker.exporters import pressure as pressure_families
from stoker.exporters import webconfig
from stoker.exporters import rdma as rdma_families
from stoker.exporters.exposition import Exposition
from stoker.exporters.hints import make_hint_app
from stoker.exporters.inventory import Inventory
from stoker.exporters.process import ProcessMetrics
from stoker.exporters.http import log_loop_errors, make_app, raise_fd_limit, serve
from stoker.probe_child import CHECK_TAG
from stoker.sources.jobs import JobSource
from stoker.sources.netdev import EthtoolReader
from stoker.sources.nfs import NfsSource
from stoker.sources.pressure import PressureSource
from stoker.sources.rdma import RdmaSource

log = logs.get("agent")

SHUTDOWN_GRACE = 3.0
HINT_CONNECTIONS = 16
"""The hint API serves one training job's hints on loopback: a few connections at a time."""


class Agent:
    def __init__(self, config: Config, platform: Platform, checking: bool = False, config_file: str | None = None):
        """`checking`: a `stoker check` beside the service, with its configuration: the service's state
        file is read, never written, and the NAS probes use files of their own. `config_file`: the file
        the configuration came from (logged at start: which file a command read is one rule, config.path_for)."""
        self.config = config
        self.config_file = config_file
        self.platform = platform
        self.exposition = Exposition()
        interval = config.agent.interval
        self.gpu = self.rdma = self.nfs = self.host = None
        self.netdev: NetdevCollector | None = None
        self.probes: ProbeCollector | None = None
        self.verdicts: VerdictCollector | None = None
        if config.gpu.enabled:
            self.gpu = gpu_collector(platform.nvml, interval, config.gpu.slow_interval, config.gpu.call_timeout,
                                     on_driver_replaced=lambda: self._exit(EXIT_DRIVER_REPLACED))
        if config.rdma.enabled:
            # each cycle: what the verdicts judge (port state, these hw_counters); the rest, only exported,
            # on the slow tier (sources/rdma.py)
            rdma = RdmaSource(config.agent.sysfs_root, every_cycle=evidence.CONGESTION + evidence.RETRANSMITS)
            self.rdma_export = rdma_families.RdmaFamilies(config.rdma.hw_counters)
            self.rdma = SourceCollector("rdma", interval, rdma, self.rdma_export, config.rdma.call_timeout)
        if config.netdev.enabled:
            wanted = watched_interfaces(self._rdma_interfaces, config.netdev.include, config.netdev.exclude)
            self.netdev = NetdevCollector(interval, wanted, platform.links, EthtoolReader(platform.open_ethtool),
                                          config.netdev.call_timeout)
        if config.nfs.enabled:
            nfs = NfsSource(config.agent.procfs_root, config.nfs.operations, config.nfs.roles())
            self.nfs = SourceCollector("nfs", interval, nfs, nfs_families.families, config.nfs.call_timeout)
        if config.host.enabled:
            self.host = SourceCollector("host", interval, PressureSource(config.agent.procfs_root),
                                        pressure_families.families, config.host.call_timeout)
        if config.probes.targets:
            self.probes = ProbeCollector(interval, config.probes, tag=CHECK_TAG if checking else "")
        if config.detect.enabled:
            # which job holds each GPU: the GPU processes' cgroups (procfs, else cgroupfs), read in a
            # worker thread before each tick's accounting (docs/JOBS.md)
            jobs = JobAttributor(JobSource(config.agent.procfs_root, config.agent.sysfs_root),
                                 config.gpu.call_timeout) if config.gpu.enabled else None
            self.verdicts = VerdictCollector(interval, config.detect, config.checkpoint, self.view,
                                             state_file=config.agent.state_file, jobs=jobs, keep_state=not checking)
        self.collectors: list[Collector] = [c for c in (self.gpu, self.rdma, self.netdev, self.nfs, self.host,
                                                        self.probes, self.verdicts) if c is not None]
        chained = {"gpu": self.verdicts} if self.gpu and self.verdicts else {}
        self.supervisor = Supervisor(self.collectors, self.exposition, self._build_labels, chained=chained)
        present = {}
        if self.gpu:
            present["gpu"] = lambda: len(self.gpu.snapshot.gpus) if self.gpu.snapshot else None
        if self.rdma:
            present["rdma_port"] = lambda: len(self.rdma.snapshot.ports) if self.rdma.snapshot else None
        self.inventory = Inventory(config.inventory, present, config.agent.state_file, read_only=checking)
        self.supervisor.registry.register(self.inventory)  # rendered with the agent's own metrics
        if config.agent.process_metrics:  # the agent's own process (exporters/process.py)
            self.supervisor.registry.register(ProcessMetrics())
        self.stop_event = asyncio.Event()
        self.exit_status = 0
        self.port: int | None = None
        self._listener = None
        self._hint_listener = None
        self.hint_url: str | None = None
        self._background: list[asyncio.Task] = []
        self._reloading: asyncio.Future | None = None

    def view(self, t: float) -> NodeView:
        """The node as the collectors last saw it."""
        return NodeView(
            t,
            gpu=self.gpu.snapshot if self.gpu else None,
            rdma=self.rdma.snapshot if self.rdma else None,
            net=self.netdev.snapshot if self.netdev else None,
            nfs=self.nfs.snapshot if self.nfs else None,
            host=self.host.snapshot if self.host else None,
            sampled={c.name: c.sampled_at for c in (self.rdma, self.netdev, self.nfs, self.host)
                     if c is not None and c.sampled_at is not None},
            probes=self.probes.states() if self.probes else [])

    def _rdma_interfaces(self) -> list[str]:
        snapshot = self.rdma.snapshot if self.rdma else None
        return [p.interface for p in snapshot.ports] if snapshot else []

    def _build_labels(self) -> dict[str, str]:
        source = self.gpu.source if self.gpu else None
        return {"version": __version__,
                "nvml_version": source.nvml_version if source else "",
                "driver_version": source.driver_version if source else ""}

    async def start(self, serve_http: bool = True) -> None:
        """Start sampling; `serve_http=False` (for `stoker check`) opens no port."""
        host, port = parse_listen(self.config.agent.listen)
        open_files = None
        if serve_http:
            open_files = raise_fd_limit()
            log_loop_errors(asyncio.get_running_loop())
            # the operator's files in a thread: one on a hung NFS mount would block the loop, and SIGTERM
            # with it (config.read_text gives up on the read after READ_DEADLINE)
            web_file = self.config.agent.web_config_file
            web = await asyncio.to_thread(webconfig.load, web_file) if web_file else None
            app = make_app(self.exposition, self.supervisor.stale)
            if web:
                webconfig.secure(app, web)
            self._listener = await serve(app, host, port, web.ssl_context if web else None)
            self.port = self._listener.port
            await self._serve_hints()
        self._background += [asyncio.create_task(job(self)) for job in self.platform.background]
        self._background.append(asyncio.create_task(self.inventory.run()))
        await self.supervisor.start()
        log.info("stoker started", version=__version__, config_file=self.config_file, listen=f"{host}:{self.port}",
                 collectors=[c.name for c in self.collectors], interval=self.config.agent.interval,
                 open_files=open_files)

    async def _serve_hints(self) -> None:
        """The checkpoint hint API, on its own (loopback) listener, when a token is configured."""
        cfg = self.config.checkpoint
        if self.verdicts is None or not cfg.token_file:
            return
        # read_text refuses anything but a regular file (a FIFO would block its open()), and reads in a
        # thread of its own with a deadline (a hung NFS mount would block its read): in a thread here
        # too, so the loop and SIGTERM go on meanwhile.
        # the token is the file less one trailing newline, compared exactly (docs/OPERATIONS.md, step 3)
        token = (await asyncio.to_thread(read_text, cfg.token_file, "checkpoint.token_file")).removesuffix("\n")
        if len(token) < 16:
            raise ConfigError(f"checkpoint.token_file: {cfg.token_file}: the token is shorter than 16 characters")
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise ConfigError(f"checkpoint.token_file: {cfg.token_file}: the token must be printable ASCII "
                              "without spaces, one trailing newline at most (it is sent in an HTTP header)")
        host, port = parse_listen(cfg.listen, "checkpoint.listen")
        app = make_hint_app(self.verdicts.checkpoints, token, self.verdicts.goodput)
        self._hint_listener = await serve(app, host, port, max_connections=HINT_CONNECTIONS)
        self.hint_url = f"http://{host}:{self._hint_listener.port}"
        log.info("hint API listening", url=self.hint_url)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        try:
            await within(self.supervisor.stop(), SHUTDOWN_GRACE)
        except asyncio.TimeoutError:
            log.warning("collectors did not close in time; exiting anyway")
        for listener in (self._listener, self._hint_listener):
            if listener is not None:
                await listener.close()
        log.info("stoker stopped")

    def _exit(self, status: int) -> None:
        """Stop serving and end the process with `status` (what `run` returns)."""
        self.exit_status = status
        self.stop_event.set()

    async def run(self, reload: Callable[[], Config] | None = None) -> int:
        """Serve until SIGTERM/SIGINT (0) or a collector asks for a new process (its status); SIGHUP calls
        `reload` for a new configuration."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup, reload)
        await self.start()
        systemd.notify("READY=1\nSTATUS=sampling")
        interval = systemd.watchdog_interval()
        if interval:
            self._background.append(asyncio.create_task(systemd.watchdog(interval)))
        try:
            await self.stop_event.wait()
        finally:
            systemd.notify("STOPPING=1")
            await self.stop()
        return self.exit_status

    def _on_hangup(self, reload: Callable[[], Config]) -> None:
        """SIGHUP: `reload` reads the configuration file in a thread, so the loop serves, samples, pings
        the watchdog and hears SIGTERM while it reads (a file on a hung NFS mount is given up after
        config.READ_DEADLINE). A SIGHUP that comes while a reload is under way is that reload's."""
        if self._reloading is not None and not self._reloading.done():
            log.warning("configuration reload already under way; this SIGHUP is left to it")
            return
        self._reloading = asyncio.ensure_future(self._reload(reload))
        self._background.append(self._reloading)  # cancelled by stop()

    async def _reload(self, reload: Callable[[], Config]) -> None:
        """Whatever fails (a bad file is a ConfigError; anything else is a bug, logged with its
        traceback), the running configuration stays and READY=1 follows RELOADING=1: without it
        systemd would consider the service reloading for ever. Cancelled (the agent stops), it
        says nothing more: STOPPING=1 is said."""
        systemd.notify("RELOADING=1")
        try:
            self.apply(await asyncio.to_thread(reload))
        except ConfigError as exc:
            log.error("configuration reload refused; keeping the running one", error=str(exc))
        except Exception as exc:
            log.error("configuration reload refused; keeping the running one", error=f"{type(exc).__name__}: {exc}",
                      exc_info=True)
        systemd.notify("READY=1")

    def apply(self, new: Config) -> None:
        """Take a new configuration without restarting: intervals, deadlines, thresholds, probe
        targets, NFS roles and operations, watched interfaces. Every collector and its counters
        live on; what needs a new process (listen addresses, enabling a collector, paths) is
        logged and left as it was."""
        old = self.config
        fixed = [("agent", "listen"), ("agent", "web_config_file"), ("agent", "sysfs_root"), ("agent", "procfs_root"),
                 ("agent", "state_file"), ("agent", "process_metrics"), ("checkpoint", "listen"),
                 ("checkpoint", "token_file"),
                 *((section, "enabled") for section in ("gpu", "rdma", "netdev", "nfs", "host", "detect"))]
        if self.probes is None:
            fixed.append(("probes", "targets"))  # no probe collector to give them to
        needs_restart = [(sec, key) for sec, key in fixed
                         if getattr(getattr(old, sec), key) != getattr(getattr(new, sec), key)]
        for sec, key in needs_restart:  # what keeps running is what the configuration says
            section = dataclasses.replace(getattr(new, sec), **{key: getattr(getattr(old, sec), key)})
            new = dataclasses.replace(new, **{sec: section})
        for c in self.collectors:
            c.interval = new.agent.interval
        if self.gpu:
            self.gpu.timeout = new.gpu.call_timeout
            self.gpu.source.slow_interval = new.gpu.slow_interval
        if self.rdma:
            self.rdma.timeout = new.rdma.call_timeout
            self.rdma_export.select(new.rdma.hw_counters)
        if self.netdev:
            self.netdev.timeout = new.netdev.call_timeout
            self.netdev.wanted = watched_interfaces(self._rdma_interfaces, new.netdev.include, new.netdev.exclude)
        if self.host:
            self.host.timeout = new.host.call_timeout
        if self.nfs:
            self.nfs.timeout = new.nfs.call_timeout
            self.nfs.source.operations = frozenset(new.nfs.operations)
            self.nfs.source.roles = new.nfs.roles()
        if self.probes:
            self.probes.configure(new.probes)
        if self.verdicts:
            self.verdicts.configure(new.detect, new.checkpoint)
        self.inventory.configure(new.inventory)
        self.config = new
        if needs_restart:
            log.warning("configuration reloaded; some changes need a restart and were not applied",
                        keys=[f"{sec}.{key}" for sec, key in needs_restart])
        else:
            log.info("configuration reloaded", interval=new.agent.interval)


async def run_side_by_side(agents: list[Agent], stop: asyncio.Event) -> None:
    """Agents side by side in one event loop (a simulated fleet or cluster) until `stop`; every one is
    stopped however it ends."""
    try:
        for agent in agents:
            await agent.start()
        await stop.wait()
    finally:
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
