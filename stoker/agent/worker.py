"""Blocking calls (NVML, sysfs, ioctl) run in a worker thread with a deadline.

Each collector owns one daemon thread. A call that outlives its deadline
fails the cycle with `CollectorError("timeout")`; while it is still stuck in
the driver, later cycles fail at once with reason ``hung`` instead of piling up
threads. Daemon threads never block interpreter exit, so a hung driver call
cannot hold up shutdown.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable


class CollectorError(Exception):
    """A failed collector cycle with a short machine-readable reason for metrics."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


class Worker:
    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"stoker-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine
                outcome = (future.set_exception, exc)
            else:
                outcome = (future.set_result, result)
            self._busy.clear()
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop closed while the call hung: nobody is waiting
                pass

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
        if self._busy.is_set():
            raise CollectorError("hung", f"{self.name}: previous call still running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._busy.set()
        self._jobs.put((loop, future, fn, args))
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
        except asyncio.CancelledError:  # shutting down: the outcome, when it comes, is nobody's
            future.add_done_callback(_consume)
            raise
        if not done:
            future.add_done_callback(_consume)
            raise CollectorError("timeout", f"{self.name}: call exceeded {timeout:.3g}s")
        return future.result()

    def close(self) -> None:
        self._jobs.put(None)


def _settle(future: asyncio.Future, setter, value) -> None:
    if not future.done():
        setter(value)


def _consume(future: asyncio.Future) -> None:
    """Retrieve a late outcome nobody awaits, so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


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
