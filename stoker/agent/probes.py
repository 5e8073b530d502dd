"""Active NAS probes: one child process per mount, at most one probe outstanding.

A hung hard NFS mount blocks whoever touches it in the kernel, forever. So the
agent never does: `stoker.probe_child` does, in its own process, and the agent
only waits on a pipe with a deadline. At the deadline the child is killed and
counted as a timeout; a child the kernel will not let die (D state) is reaped
in the background, and until it is, no new probe starts for that mount. A
child also dies when the agent does, whatever kills it (probe_child.py: the
kernel's parent-death signal, for the thread that forks, this event loop's).

`stoker_nas_probe_inflight_seconds` is the time since the mount stopped
answering: it starts with the first probe that got no answer and keeps growing
through timeouts and retries until a probe answers, so a mount hung for ten
minutes reads ten minutes, not the age of the latest retry.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from stoker import logs
from stoker.agent.collector import Collector
from stoker.agent.worker import within
from stoker.config import ProbesConfig, ProbeTarget
from stoker.detect.view import ProbeState
from stoker.histogram import Histogram

log = logs.get("probes")

PROBES = ("write", "read", "metadata")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Mount:
    target: ProbeTarget
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None
    reaping: asyncio.Task | None = None
    unanswered_since: float | None = None  # start of the first probe the mount has not answered
    next_due: float = 0.0
    latency: dict[str, Histogram] = field(default_factory=lambda: {p: Histogram(BUCKETS) for p in PROBES})
    latest: dict[str, float] = field(default_factory=dict)  # seconds of the last completed probe
    failures: dict[str, int] = field(default_factory=lambda: {"timeout": 0, "error": 0})


class ProbeCollector(Collector):
    name = "nasprobe"

    def __init__(self, interval: float, config: ProbesConfig, clock: Callable[[], float] = time.monotonic,
                 tag: str = ""):
        """`tag`: in the probe files' names (probe_child.py), so that `stoker check` never uses the service's."""
        self.interval = interval
        self.config = config
        self._clock = clock
        self.mounts = [Mount(t) for t in config.targets]
        self.tag = tag

    def configure(self, config: ProbesConfig) -> None:
        """New targets, interval, deadline or size; mounts probed before keep their histograms."""
        known = {m.target.mountpoint: m for m in self.mounts}
        self.config = config
        self.mounts = []
        for target in config.targets:
            m = known.get(target.mountpoint) or Mount(target)
            if m.target != target and m.proc is not None:
                self._kill(m)  # its child probes the old directory
            m.target = target
            self.mounts.append(m)

    async def cycle(self) -> list[str]:
        """Start the probes that are due; never waits for one."""
        now = self._clock()
        for m in self.mounts:
            busy = m.task is not None and not m.task.done()
            unreaped = m.reaping is not None and not m.reaping.done()
            if not busy and not unreaped and now >= m.next_due:
                m.next_due = now + self.config.interval
                m.task = asyncio.create_task(self._probe(m), name=f"probe {m.target.mountpoint}")
        return []

    async def _probe(self, m: Mount) -> None:
        if m.unanswered_since is None:
            m.unanswered_since = self._clock()
        try:
            if m.proc is None or m.proc.returncode is not None:
                m.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "stoker.probe_child", m.target.directory, str(self.config.size), self.tag,
                    str(os.getpid()),  # the child dies with this process (probe_child.die_with_parent)
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
            m.proc.stdin.write(b"probe\n")
            line = await within(m.proc.stdout.readline(), self.config.timeout)
            if not line:
                raise EOFError("probe child exited")
            self._record(m, json.loads(line))
            m.unanswered_since = None
        except asyncio.TimeoutError:
            m.failures["timeout"] += 1
            log.warning("NAS probe timed out", mountpoint=m.target.mountpoint, timeout=self.config.timeout,
                        unanswered_seconds=round(self._clock() - m.unanswered_since, 1))
            self._kill(m)
        except (OSError, EOFError, ValueError) as exc:
            m.failures["error"] += 1
            m.unanswered_since = None  # the probe itself failed; that is not the mount hanging
            log.warning("NAS probe failed", mountpoint=m.target.mountpoint, error=str(exc))
            self._kill(m)

    def _record(self, m: Mount, result: dict) -> None:
        for probe in PROBES:
            value = result.get(probe)
            if isinstance(value, (int, float)):
                m.latency[probe].observe(float(value))
                m.latest[probe] = float(value)
            else:
                m.failures["error"] += 1

    def _kill(self, m: Mount) -> None:
        """Kill the child; until the kernel lets it go, no new probe starts on that mount."""
        proc, m.proc = m.proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        m.reaping = asyncio.create_task(proc.wait(), name=f"reap probe {m.target.mountpoint}")

    def _unanswered(self, m: Mount, now: float) -> float:
        return 0.0 if m.unanswered_since is None else now - m.unanswered_since

    def states(self) -> list[ProbeState]:
        now = self._clock()
        return [ProbeState(m.target.mountpoint, self._unanswered(m, now), dict(m.latest)) for m in self.mounts]

    def families(self):
        now = self._clock()
        latency = HistogramMetricFamily("stoker_nas_probe_seconds", "Active NAS probe latency.",
                                        labels=["mountpoint", "probe"])
        inflight = GaugeMetricFamily("stoker_nas_probe_inflight_seconds", "Time since the mount stopped answering "
                                     "probes (through timeouts and retries), 0 while it answers.",
                                     labels=["mountpoint"])
        failures = CounterMetricFamily("stoker_nas_probe_failures", "Failed probes.", labels=["mountpoint", "reason"])
        for m in self.mounts:
            mp = m.target.mountpoint
            for probe, h in m.latency.items():
                latency.add_metric([mp, probe], h.buckets(), h.total)
            inflight.add_metric([mp], self._unanswered(m, now))
            for reason, n in m.failures.items():
                failures.add_metric([mp, reason], n)
        return [latency, inflight, failures]

    async def close(self) -> None:
        """Kill every child and give them a second to go; one stuck in the kernel is left behind."""
        waits = []
        for m in self.mounts:
            if m.task is not None:
                m.task.cancel()
            if m.proc is not None and m.proc.returncode is None:
                try:
                    m.proc.kill()
                except ProcessLookupError:
                    pass
                waits.append(asyncio.ensure_future(m.proc.wait()))
            if m.reaping is not None and not m.reaping.done():
                waits.append(m.reaping)
        if waits:
            await asyncio.wait(waits, timeout=1.0)
