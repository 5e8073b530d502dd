"""A collector made of a source (sampled in a worker thread) and a families function.

The snapshot of the last successful cycle is what `/metrics` shows; a failed
cycle clears it, so stale readings never pass for current ones.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from stoker.agent.collector import Collector
from stoker.agent.worker import CollectorError, Worker


class SourceCollector(Collector):
    def __init__(self, name: str, interval: float, source: Any,
                 to_families: Callable[[Any], Iterable], timeout: float,
                 close: Callable[[], None] | None = None):
        """`source.sample()` runs in the worker thread; `close` (if any) too, at shutdown."""
        self.name = name
        self.interval = interval
        self.timeout = timeout
        self.source = source
        self.snapshot: Any = None
        self.sampled_at: float | None = None  # monotonic: when the snapshot was taken (rates need it)
        self._to_families = to_families
        self._close = close
        self._worker = Worker(name)

    async def cycle(self) -> list[str]:
        try:
            snapshot = await self._worker.call(self.source.sample, timeout=self.timeout)
        except CollectorError:
            self.snapshot = None
            raise
        except Exception as exc:
            self.snapshot = None
            reason = getattr(exc, "reason", None)
            if reason:  # a classified failure of the source (no driver, ...)
                raise CollectorError(reason, str(exc)) from exc
            raise
        self.snapshot, self.sampled_at = snapshot, time.monotonic()
        return snapshot.problems

    def families(self):
        return self._to_families(self.snapshot) if self.snapshot is not None else []

    async def close(self) -> None:
        if self._close is not None:
            try:
                await self._worker.call(self._close, timeout=1.0)
            except CollectorError:
                pass  # the call is hung in the kernel or driver: the daemon thread is abandoned at exit
        self._worker.close()
