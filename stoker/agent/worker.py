"""Blocking calls (NVML, sysfs, ioctl) run in a sampling thread with a deadline.

The calls of one event loop's collectors run one after another in one daemon
thread, the lane (`_Lane`). The collectors tick together: the calls they make
in one pass of the loop go to the thread as one batch, and come back in one
wake-up of the loop when the batch is done. One collector per thread, as
before, cost two thread wake-ups per collector per tick, and threads woken
together fought for the GIL, which every file read and driver call releases:
on a virtual machine each wake-up costs tens of microseconds (an exit to the
hypervisor), and that was a third of the agent's CPU (docs/PERFORMANCE.md).

A call's deadline runs from its start in the thread. A call that outlives it
fails with `CollectorError("timeout")`; the thread, stuck in the driver, is
left to it: the calls that were to follow run in a new thread, and the stuck
one ends when its call returns. While a call is stuck, later calls of the same
worker fail at once with reason ``hung`` instead of piling up. So a hung call
holds the others back once, until its deadline. Daemon threads never block
interpreter exit, so a hung driver call cannot hold up shutdown.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import queue
import threading
import time
import weakref
from typing import Any, Callable


class CollectorError(Exception):
    """A failed collector cycle with a short machine-readable reason for metrics."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


class Worker:
    """A collector's way to the lane: its calls, its deadline, whether one is stuck."""

    def __init__(self, name: str):
        self.name = name
        self._busy = threading.Event()  # a call submitted and not returned (set on the loop, cleared in the thread)
        self.seconds = 0.0
        """Time the lane spent in this worker's calls (the benchmarks share the lane's CPU by it)."""
        _workers.add(self)

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        """`fn(*args)` in the lane. Past `timeout` from its start the future fails with `timeout`;
        the call's outcome, when it comes, is then nobody's and dropped, as after a cancellation."""
        if self._busy.is_set():
            raise CollectorError("hung", f"{self.name}: previous call still running")
        loop = asyncio.get_running_loop()
        job = _Job(self, loop.create_future(), fn, args, timeout)
        self._busy.set()
        submitted = time.monotonic()
        _lane(loop).submit(job)
        try:
            return await job.future
        finally:
            waited = queued.get()
            if waited is not None and job.started is not None:
                waited[0] += max(0.0, job.started - submitted)

    def close(self) -> None:
        """Nothing to release: the lane's thread is shared (and ends with its event loop)."""


_workers: weakref.WeakSet = weakref.WeakSet()

queued = contextvars.ContextVar("stoker_lane_queued", default=None)
"""A one-item list the supervisor sets around a cycle: the seconds that cycle's calls waited for
their turn in the lane are added to it, so a cycle's duration is its own work, not the others'."""


def workers() -> list[Worker]:
    """Every live worker of the process (for the benchmarks)."""
    return list(_workers)


class _Job:
    __slots__ = ("worker", "future", "fn", "args", "timeout", "started")

    def __init__(self, worker: Worker, future: asyncio.Future, fn: Callable, args: tuple, timeout: float):
        self.worker, self.future, self.fn, self.args, self.timeout = worker, future, fn, args, timeout
        self.started: float | None = None  # monotonic, set by the thread


class _Batch:
    """The calls submitted in one pass of the event loop, run in order by one thread."""

    def __init__(self, jobs: list[_Job]):
        self.jobs = jobs
        self.next = 0  # the first job not started
        self.current: _Job | None = None
        self.outcomes: list[tuple] = []  # (job, setter, value) of the jobs done, not yet delivered
        self.closed = False  # the thread took its last job: later ones go in a new batch
        self.abandoned = False  # the loop gave up on this thread (a call past its deadline)
        self.lock = threading.Lock()
        self.watchdog: asyncio.TimerHandle | None = None


_lanes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Lane
_thread_numbers = itertools.count(1)


def _lane(loop: asyncio.AbstractEventLoop) -> _Lane:
    lane = _lanes.get(loop)
    if lane is None:
        lane = _lanes[loop] = _Lane(loop)
        weakref.finalize(loop, lane.stop)
    return lane


class _Lane:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        self._pending: list[_Job] = []
        self._running: _Batch | None = None  # the last batch handed to the thread
        self._queue: queue.SimpleQueue = self._start_thread()

    def _start_thread(self) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(q,), name=f"stoker-sampling-{next(_thread_numbers)}",
                         daemon=True).start()
        return q

    def stop(self) -> None:
        self._queue.put(None)

    def submit(self, job: _Job) -> None:
        """Queue the job; the jobs queued in this pass of the loop go to the thread together, and a
        job queued while the thread still works through the last batch joins that batch (a collector
        that first awaited something on the loop still rides with the others)."""
        running = self._running
        if running is not None and not self._pending:
            with running.lock:
                if not running.closed:
                    running.jobs.append(job)
                    return
        if not self._pending:
            job.future.get_loop().call_soon(self._flush)
        self._pending.append(job)

    def _flush(self) -> None:
        jobs, self._pending = self._pending, []
        if jobs:
            self._dispatch(_Batch(jobs))

    def _dispatch(self, batch: _Batch) -> None:
        self._running = batch
        loop = self._loop()
        if loop is not None:
            batch.watchdog = loop.call_later(min(j.timeout for j in batch.jobs), self._watch, batch)
        self._queue.put(batch)

    def _serve(self, q: queue.SimpleQueue) -> None:
        while True:
            batch = q.get()
            if batch is None:
                return
            if not self._run(batch):
                return  # the loop gave up on this thread while a call hung: it ends here

    def _run(self, batch: _Batch) -> bool:
        clock = time.perf_counter  # the thread's own CPU clock lags behind short calls on a VM
        while True:
            with batch.lock:
                if batch.next >= len(batch.jobs):
                    batch.closed = True
                    break
                job = batch.jobs[batch.next]
                batch.next += 1
                batch.current = job
                job.started = time.monotonic()
            cpu = clock()
            try:
                if job.future.cancelled():
                    outcome = None  # its collector stopped waiting before it started
                else:
                    outcome = (job.future.set_result, job.fn(*job.args))
            except BaseException as exc:  # handed to the awaiting coroutine
                outcome = (job.future.set_exception, exc)
            job.worker.seconds += clock() - cpu
            with batch.lock:
                batch.current = None
                job.worker._busy.clear()
                if batch.abandoned:
                    return False
                if outcome is not None:
                    batch.outcomes.append((job, *outcome))
        loop = self._loop()
        if loop is not None:
            try:
                loop.call_soon_threadsafe(_done, batch)  # one wake-up of the loop for the whole batch
            except RuntimeError:  # the loop closed while a call hung: nobody is waiting
                pass
        return True

    def _watch(self, batch: _Batch) -> None:
        """On the loop: the earliest deadline of the batch passed. Fail a call past its own."""
        loop = self._loop()
        with batch.lock:
            if batch.next >= len(batch.jobs) and batch.current is None:
                return  # done: its outcomes are on their way
            job, now = batch.current, time.monotonic()
            if job is None or now < job.started + job.timeout:
                due = job.started + job.timeout - now if job is not None else min(
                    j.timeout for j in batch.jobs[batch.next:])  # not started: the thread is busy before it
                if loop is not None:
                    batch.watchdog = loop.call_later(max(due, 0.001), self._watch, batch)
                return
            batch.abandoned = batch.closed = True
            done, rest = batch.outcomes, batch.jobs[batch.next:]
            batch.next = len(batch.jobs)
        _settle_all(done)
        _settle_all([(job, job.future.set_exception,
                      CollectorError("timeout", f"{job.worker.name}: call exceeded {job.timeout:.3g}s"))])
        # the stuck thread is left to its call; what was to follow it runs in a new one
        stuck, self._queue = self._queue, self._start_thread()
        while True:
            try:
                waiting = stuck.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                self._queue.put(waiting)
        if rest:
            self._dispatch(_Batch(rest))


def _done(batch: _Batch) -> None:
    if batch.watchdog is not None:
        batch.watchdog.cancel()
    _settle_all(batch.outcomes)


def _settle_all(outcomes: list[tuple]) -> None:
    for job, setter, value in outcomes:
        if not job.future.done():
            setter(value)


async def within(awaitable, timeout: float):
    """Await with a deadline; raises `asyncio.TimeoutError` past it.

    Unlike `asyncio.wait_for` on Python 3.11, a cancellation of the caller that
    races with the awaitable finishing is never swallowed (gh-86296): a lost
    cancellation would keep a collector's loop alive through shutdown.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
