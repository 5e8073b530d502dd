"""Step hints from PyTorch Lightning; imports Lightning only when built.

    from stoker.hints_adapters.lightning import StokerCallback

    trainer = lightning.Trainer(..., callbacks=[StokerCallback(tokens_per_step=global_batch * seq_len)])

A step is reported when `trainer.global_step` (optimizer steps) moves on, at the
end of a training batch: with gradient accumulation, once per optimizer step.
Works with `lightning.pytorch` and the older `pytorch_lightning` package. Its data wait is the time
from the end of each training batch (or the start of training) to the start of the next
(`on_train_batch_start` comes once the batch is fetched), over the batches of the optimizer step;
the node count, when the environment does not give it, is the Trainer's `num_nodes`.
"""

from __future__ import annotations

import time
from typing import Any

from stoker import hints
from stoker.hints_adapters._common import import_first, never_raises, reporter_or_default

_classes: dict[type, type] = {}


class _LightningSteps:
    """The hooks, mixed into Lightning's `Callback` (every other hook is the base's no-op)."""

    def __init__(self, reporter: hints.Steps | None = None, tokens_per_step: int | None = None,
                 samples_per_step: int | None = None):
        super().__init__()
        self._reporter = reporter_or_default(reporter)
        self._tokens, self._samples = tokens_per_step, samples_per_step
        self._last_step: int | None = None
        self._ended: float | None = None  # the last batch's end (monotonic), or the start of training

    @never_raises
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = int(trainer.global_step)  # a resumed run goes on from here
        self._ended = time.monotonic()
        if getattr(self._reporter, "nodes", 0) is None and getattr(trainer, "num_nodes", None):
            self._reporter.nodes = int(trainer.num_nodes)

    @never_raises
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._ended is not None:
            self._reporter.waited(time.monotonic() - self._ended)

    @never_raises
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._ended = time.monotonic()
        step = int(trainer.global_step)
        if self._last_step is not None and step <= self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = step
        self._reporter.step(step, self._tokens, self._samples)


def StokerCallback(reporter: hints.Steps | None = None, tokens_per_step: int | None = None,
                   samples_per_step: int | None = None):
    """A Lightning `Callback` that reports each optimizer step to the agent."""
    base = import_first("lightning.pytorch", "pytorch_lightning").Callback
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type("StokerCallback", (_LightningSteps, base), {"__module__": __name__})
    return cls(reporter, tokens_per_step, samples_per_step)
