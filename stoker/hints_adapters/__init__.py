"""Step hints from training frameworks, as thin adapters over `stoker.hints.Steps`.

Each module imports its framework only when its adapter is used, never at
import: none of them is a dependency of Stoker.

- `pytorch`: `track_optimizer(optimizer)` reports a step each time
  `optimizer.step()` returns; `steps(loader)` wraps a plain loop.
- `huggingface`: `StokerCallback()` for `transformers.Trainer(callbacks=[...])`.
- `lightning`: `StokerCallback()` for `lightning.Trainer(callbacks=[...])`.

A hook that fails logs one warning and goes quiet: telemetry never breaks a run.
"""
