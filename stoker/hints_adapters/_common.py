"""What the adapters share: the reporter, and hooks that never raise into the training loop."""

from __future__ import annotations

import functools
import logging

from stoker import hints

log = logging.getLogger("stoker.hints")


def reporter_or_default(reporter: hints.Steps | None) -> hints.Steps:
    return reporter if reporter is not None else hints.default_steps()


def never_raises(method):
    """A hook that logs its first failure and then does nothing: the run goes on."""

    @functools.wraps(method)
    def hook(self, *args, **kwargs):
        if getattr(self, "_stoker_failed", False):
            return None
        try:
            method(self, *args, **kwargs)
        except Exception as exc:
            self._stoker_failed = True
            log.warning("stoker: %s step hook failed, step hints stop: %s: %s", type(self).__name__,
                        type(exc).__name__, exc)
        return None

    return hook


def import_first(*names: str):
    """The first of these modules that imports (the framework's current and former package names)."""
    import importlib

    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("none of " + ", ".join(names) + " can be imported (" + "; ".join(errors) + ")")
