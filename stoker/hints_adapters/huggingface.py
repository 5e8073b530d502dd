"""Step hints from a Hugging Face `transformers.Trainer`; imports transformers only when built.

    from stoker.hints_adapters.huggingface import StokerCallback

    trainer = Trainer(model, args, ..., callbacks=[StokerCallback()])

A step is reported at each `on_step_end` (an optimizer step: `state.global_step`), with the
tokens the Trainer counted since the last one when it counts them
(`include_num_input_tokens_seen=True`), and the samples of the global batch
(per-device batch x gradient accumulation x world size). Its data wait is the time from the
previous step's end (or the start of training) to this step's `on_step_begin`: the Trainer fetches
the step's batches in between (`get_batch_samples`, before `on_step_begin`), and also logs,
evaluates and saves there (`_maybe_log_save_evaluate`, after `on_step_end`), which this counts too.
"""

from __future__ import annotations

import time
from typing import Any

from stoker import hints
from stoker.hints_adapters._common import import_first, never_raises, reporter_or_default

_classes: dict[type, type] = {}


class _HuggingFaceSteps:
    """The hooks, mixed into `transformers.TrainerCallback` (every other event is the base's no-op)."""

    def __init__(self, reporter: hints.Steps | None = None, tokens_per_step: int | None = None):
        super().__init__()
        self._reporter = reporter_or_default(reporter)
        self._tokens_per_step = tokens_per_step
        self._last_step: int | None = None
        self._tokens_seen = 0
        self._ended: float | None = None  # the last step's end (monotonic), or the start of training
        self._data_wait: float | None = None

    @never_raises
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_step = int(state.global_step)  # a resumed run goes on from here
        self._tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._ended = time.monotonic()

    @never_raises
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._ended is not None:
            self._data_wait = time.monotonic() - self._ended

    @never_raises
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if self._last_step is not None and step <= self._last_step:
            return
        self._last_step, self._ended = step, time.monotonic()
        data_wait, self._data_wait = self._data_wait, None
        tokens = self._tokens_per_step
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if tokens is None and seen > self._tokens_seen:
            tokens = seen - self._tokens_seen
        self._tokens_seen = seen
        samples = None
        batch = getattr(args, "per_device_train_batch_size", None)
        if batch:
            samples = int(batch) * int(getattr(args, "gradient_accumulation_steps", 1) or 1) * int(
                getattr(args, "world_size", 1) or 1)
        self._reporter.step(step, tokens, samples, data_wait=data_wait)


def StokerCallback(reporter: hints.Steps | None = None, tokens_per_step: int | None = None):
    """A `transformers.TrainerCallback` that reports each optimizer step to the agent."""
    base = import_first("transformers").TrainerCallback
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type("StokerCallback", (_HuggingFaceSteps, base), {"__module__": __name__})
    return cls(reporter, tokens_per_step)
