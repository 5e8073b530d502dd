"""Runs each collector on its own drift-free schedule and keeps the agent alive.

An exception in a collector is logged (once, then as periodic reminders),
counted in ``stoker_collector_errors_total`` and retried on the next tick;
it never stops the agent. After every cycle the collector's chunk of the
exposition and the agent's own metrics are marked changed; they are rendered
when the exposition is next asked for (`Exposition.set_source`), once.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from stoker import logs
from stoker.agent.collector import Collector
from stoker.agent import worker
from stoker.agent.worker import CollectorError
from stoker.exporters.exposition import Exposition, render

log = logs.get("supervisor")

# `_created` samples double the agent's own series and no dashboard uses them.
disable_created_metrics()

_gc_frozen = False

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
STALE_AFTER_INTERVALS = 3


class Supervisor:
    def __init__(
        self,
        collectors: list[Collector],
        exposition: Exposition,
        build_labels: Callable[[], dict[str, str]],
        clock: Callable[[], float] = time.time,
        chained: dict[str, Collector] | None = None,
    ):
        """`chained`: a collector that runs right after another's cycle instead of on its own
        schedule (the verdicts follow the GPU samples, so a fault is judged as soon as it is seen)."""
        self.collectors = collectors
        self.chained = chained or {}
        self.exposition = exposition
        self._build_labels = build_labels
        self._clock = clock
        self._gate = logs.RepeatGate()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._started_at = clock()
        self._last_success: dict[str, float] = {}
        self._origin: float | None = None
        self._due: dict[str, float] = {}  # collector -> event-loop time of its next cycle
        self._chunks: dict[str, Callable[[], bytes | None]] = {}

        self.registry = CollectorRegistry(auto_describe=False)
        self._up = Gauge("stoker_collector_up", "1 when the last cycle of that collector succeeded.",
                         ["collector"], registry=self.registry)
        self._duration = Histogram("stoker_collector_duration_seconds", "Time one collector cycle took.",
                                   ["collector"], buckets=DURATION_BUCKETS, registry=self.registry)
        self._errors = Counter("stoker_collector_errors", "Collector failures, by class.",
                               ["collector", "reason"], registry=self.registry)
        self._lag = Histogram("stoker_collector_lag_seconds", "How late a cycle started against its schedule "
                              "(a busy or blocked event loop shows here first).", ["collector"],
                              buckets=LAG_BUCKETS, registry=self.registry)
        self._success_ts = Gauge("stoker_collector_last_success_timestamp_seconds",
                                 "When that collector last completed a cycle.", ["collector"],
                                 registry=self.registry)
        self._build = Gauge("stoker_build_info", "Stoker build and the NVML it talks to.",
                            ["version", "nvml_version", "driver_version"], registry=self.registry)
        # each collector's children of the families above, looked up once (labels() takes a lock)
        self._children: dict[str, _Children] = {}
        for c in collectors:
            self._child(c).up.set(0)

    def _child(self, c: Collector):
        child = self._children.get(c.name)
        if child is None:
            child = self._children[c.name] = _Children(
                self._up.labels(c.name), self._duration.labels(c.name), self._lag.labels(c.name))
        return child

    async def start(self) -> None:
        global _gc_frozen
        if not _gc_frozen:
            # What exists by now (modules, classes, the configuration, the collectors) lives as long as
            # the process: out of the collector's sight, a full collection walks only what the cycles
            # made since (one took 25 ms every half minute, 0.08% of a core; docs/PERFORMANCE.md).
            gc.collect()
            gc.freeze()
            _gc_frozen = True
            _release_free_heap()
        for c in self.collectors:
            try:
                await c.start()
            except Exception as exc:  # a collector that cannot start still gets cycles (and retries)
                self._record_failure(c, _reason(exc), exc)
        self._origin = asyncio.get_running_loop().time()  # every collector's grid starts here, together
        for c in self.collectors:
            if c not in self.chained.values():
                self._tasks.append(asyncio.create_task(self._run(c), name=f"collector-{c.name}"))
        self._render_self()

    def next_due(self) -> float | None:
        """Event-loop time of the next scheduled cycle, None before the first (the simulated node
        moves its files just before each cycle)."""
        return min(self._due.values()) if self._due else None

    async def stop(self) -> None:
        self._stopping = True  # ends each loop at its next tick even if a cancellation got lost
        pending = [t for t in self._tasks if not t.done()]
        while pending:
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=0.5)
            pending = [t for t in pending if not t.done()]
        await asyncio.gather(*(c.close() for c in self.collectors), return_exceptions=True)

    async def run_cycle(self, c: Collector) -> None:
        """One supervised cycle: time it, classify its failure, mark its chunk changed."""
        child = self._child(c)
        started = time.perf_counter()
        queued = worker.queued.set([0.0])  # the time its calls wait for their turn is not its own
        try:
            partial = await c.cycle()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._record_failure(c, _reason(exc), exc)
        else:
            child.up.set(1)
            now = self._clock()
            self._last_success[c.name] = now
            if child.success is None:  # the series appears with the first success
                child.success = self._success_ts.labels(c.name)
            child.success.set(now)
            for reason in partial:
                self._errors.labels(c.name, reason).inc()
            if self._gate.clear((c.name,)):
                log.info("collector recovered", collector=c.name)
        waited = worker.queued.get()[0]
        worker.queued.reset(queued)
        child.duration.observe(max(0.0, time.perf_counter() - started - waited))
        chunk = self._chunks.get(c.name)
        if chunk is None:
            chunk = self._chunks[c.name] = self._chunk(c)
        self.exposition.set_source(c.name, chunk)
        self._render_self()

    def _chunk(self, c: Collector) -> Callable[[], bytes | None]:
        """How `c`'s chunk is rendered when asked: from its families."""
        def chunk() -> bytes | None:
            try:
                return render(c.families())
            except Exception as exc:  # a bug in one family must not take the endpoint down
                self._record_failure(c, "render", exc)
                return None  # its last chunk stays
        return chunk

    async def _run(self, c: Collector) -> None:
        loop = asyncio.get_running_loop()
        due = self._origin if self._origin is not None else loop.time()
        self._due[c.name] = due
        lag = self._child(c).lag
        while not self._stopping:
            lag.observe(max(0.0, loop.time() - due))
            await self.run_cycle(c)
            follower = self.chained.get(c.name)
            if follower is not None:
                await self.run_cycle(follower)
            due += c.interval
            now = loop.time()
            if due <= now:  # overran: skip the missed ticks, stay on the original grid
                due += math.ceil((now - due) / c.interval + 1e-9) * c.interval
            self._due[c.name] = due
            await asyncio.sleep(due - now)

    def _record_failure(self, c: Collector, reason: str, exc: BaseException) -> None:
        self._child(c).up.set(0)
        self._errors.labels(c.name, reason).inc()
        self._render_self()
        suppressed = self._gate.admit((c.name,), f"{reason}: {exc}")
        if suppressed is not None:
            log.warning("collector cycle failed", collector=c.name, reason=reason, error=str(exc),
                        repeated=suppressed, exc_info=not isinstance(exc, CollectorError))

    def _render_self(self) -> None:
        """The agent's own metrics changed: rendered when asked (after the collectors' chunks)."""
        self.exposition.set_source("_agent", self._self_chunk)

    def _self_chunk(self) -> bytes:
        self._build.clear()
        self._build.labels(**self._build_labels()).set(1)
        families = list(self.registry.collect())
        try:
            return render(families)  # byte-identical to generate_latest (tested), 3x faster
        except Exception:  # one family that cannot render (10**400 read from a file) costs itself only
            return b"".join(self._render_each(families))

    def _render_each(self, families: list) -> list[bytes]:
        out = []
        for family in families:
            try:
                out.append(render([family]))
            except Exception as exc:
                suppressed = self._gate.admit(("render", family.name), f"{type(exc).__name__}: {exc}")
                if suppressed is not None:
                    log.error("metric family left out", family=family.name, error=f"{type(exc).__name__}: {exc}",
                              repeated=suppressed)
        return out

    def stale(self) -> list[str]:
        """Collectors that have not completed a cycle within 3 of their intervals."""
        now = self._clock()
        return [
            c.name for c in self.collectors
            if now - self._last_success.get(c.name, self._started_at) > STALE_AFTER_INTERVALS * c.interval
        ]


def _release_free_heap() -> None:
    """Hand the heap that loading the modules left free back to the system (glibc only): a few
    hundred kilobytes of RSS that would otherwise stay resident for the life of the agent."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Children:
    """One collector's series of the agent's own families."""

    __slots__ = ("up", "duration", "lag", "success")

    def __init__(self, up, duration, lag):
        self.up, self.duration, self.lag, self.success = up, duration, lag, None


def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, CollectorError) else type(exc).__name__
