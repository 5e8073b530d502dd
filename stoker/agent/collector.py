"""What the runtime needs of a collector: a name, an interval, a cycle, families."""

from __future__ import annotations

import abc
from typing import Iterable

from prometheus_client.metrics_core import Metric


class Collector(abc.ABC):
    name: str
    interval: float

    async def start(self) -> None:
        """Open what the collector holds for its lifetime (threads, handles)."""

    @abc.abstractmethod
    async def cycle(self) -> list[str]:
        """Sample once. Return reasons of partial failures (one file, one GPU);
        raise `CollectorError` when the whole cycle failed."""

    @abc.abstractmethod
    def families(self) -> Iterable[Metric]:
        """Metric families from the latest snapshot; cheap, no hardware access."""

    async def close(self) -> None:
        """Release what `start` opened; must return promptly even if hardware hangs."""
