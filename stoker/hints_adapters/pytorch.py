"""Step hints from a plain PyTorch training loop; imports nothing from torch.

    from stoker.hints_adapters.pytorch import track_optimizer

    track_optimizer(optimizer, tokens_per_step=global_batch * seq_len)   # a step per optimizer.step()

or, for a loop without one optimizer:

    for n, batch in steps(loader):      # step n is reported when the loop asks for the next batch
        ...

Both report each step's data wait, the time it waited for its batches (docs/JOBS.md): `steps` times
the loader itself; with `track_optimizer`, wrap the loader in `timed(loader)`.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

from stoker import hints
from stoker.hints_adapters._common import never_raises, reporter_or_default


class _OptimizerSteps:
    def __init__(self, reporter: hints.Steps, start: int, tokens: int | None, samples: int | None):
        self.reporter, self.count, self.tokens, self.samples = reporter, start, tokens, samples

    @never_raises
    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.count += 1
        self.reporter.step(self.count, self.tokens, self.samples)


def track_optimizer(optimizer: Any, reporter: hints.Steps | None = None, start: int = 0,
                    tokens_per_step: int | None = None, samples_per_step: int | None = None):
    """Report step `start + 1`, `start + 2`... each time `optimizer.step()` returns (a resumed run:
    `start` is the step it resumed from). Uses `Optimizer.register_step_post_hook` (torch 2.0);
    returns its handle (`.remove()` stops the hints)."""
    hook = _OptimizerSteps(reporter_or_default(reporter), start, tokens_per_step, samples_per_step)
    return optimizer.register_step_post_hook(hook)


def steps(iterable: Iterable, reporter: hints.Steps | None = None, start: int = 1,
          tokens_per_step: int | None = None, samples_per_step: int | None = None) -> Iterator[tuple[int, Any]]:
    """(n, item) for each item, numbered from `start`; step n is reported when the loop asks for
    the next item, or when the iterable ends (the body of step n has returned by then), with the
    time the loop waited for item n as its data wait."""
    reporter = reporter_or_default(reporter)
    n = None
    for item in timed(iterable, reporter):
        n = start if n is None else n + 1
        yield n, item
        _report(reporter, n, tokens_per_step, samples_per_step)


def timed(iterable: Iterable, reporter: hints.Steps | None = None) -> Iterator[Any]:
    """The items of `iterable` (a data loader); the time spent waiting for each is added to the data
    wait of the step under way (`Steps.waited`), which the next reported step carries."""
    reporter = reporter_or_default(reporter)
    items = iter(iterable)
    while True:
        started = time.monotonic()
        try:
            item = next(items)
        except StopIteration:
            return
        _waited(reporter, time.monotonic() - started)
        yield item


def _waited(reporter: hints.Steps, seconds: float) -> None:
    try:
        reporter.waited(seconds)
    except Exception:  # Steps.waited does not raise; a stand-in reporter might
        pass


def _report(reporter: hints.Steps, n: int, tokens: int | None, samples: int | None) -> None:
    try:
        reporter.step(n, tokens, samples)
    except Exception:  # Steps.step does not raise; a stand-in reporter might
        pass
