"""Structured logging: JSON lines under systemd, readable lines on a terminal.

A failing collector fails every cycle; `RepeatGate` lets the first occurrence
of an error through, then one reminder every `remind_after` seconds with the
count, so a broken NIC does not write a line per second into the journal.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import structlog


def want_json(log_format: str) -> bool:
    if log_format != "auto":
        return log_format == "json"
    # systemd sets JOURNAL_STREAM for services whose output goes to the journal.
    return bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()


def configure(log_format: str = "auto", level: int = logging.INFO) -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if want_json(log_format):
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str):
    return structlog.get_logger(component=name)


class RepeatGate:
    """Decides whether an error line is worth writing: new, or a reminder."""

    def __init__(self, remind_after: float = 300.0, clock=time.monotonic):
        self._remind_after = remind_after
        self._clock = clock
        self._seen: dict[tuple, tuple[str, float, int]] = {}

    def admit(self, key: tuple, message: str) -> int | None:
        """Return None to stay quiet, else how many times it was suppressed since last written."""
        now = self._clock()
        last = self._seen.get(key)
        if last is None or last[0] != message or now - last[1] >= self._remind_after:
            suppressed = 0 if last is None or last[0] != message else last[2]
            self._seen[key] = (message, now, 0)
            return suppressed
        self._seen[key] = (last[0], last[1], last[2] + 1)
        return None

    def clear(self, key: tuple) -> bool:
        """Forget a key once it recovers; True if it had been failing."""
        return self._seen.pop(key, None) is not None
