"""Step hints from PyTorch Lightning; imports Lightning only when built.

    from stoker.hints_adapters.lightning import StokerCallback

    trainer = lightning.Trainer(..., callbacks=[StokerCallback(tokens_per_step=global_batch * seq_len)])

A step is reported when `trainer.global_step` (optimizer steps) moves on, at the
end of a training batch: with gradient accumulation, once per optimizer step.
Works with `lightning.pytorch` and the older `pytorch_lightning` package.
"""

from __future__ import annotations

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

    @never_raises
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = int(trainer.global_step)  # a resumed run goes on from here

    @never_raises
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
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
