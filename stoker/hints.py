"""Checkpoint hints from a training job to the Stoker agent on its node.

Standard library only, so a training environment can import it without the
agent's dependencies. A hint that cannot be delivered is logged and dropped:
telemetry must never break a training run.

    from stoker.hints import checkpoint

    with checkpoint(path="/mnt/checkpoints/run7/step1200", expected_bytes=16 << 30):
        torch.save(state, "/mnt/checkpoints/run7/step1200/rank0.pt")

The token comes from `token=`, else $STOKER_HINT_TOKEN, else the file named by
`token_file=` or $STOKER_HINT_TOKEN_FILE (default /etc/stoker/hint-token); the
agent from `url=`, else $STOKER_HINT_URL (default http://127.0.0.1:9478).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Iterator

DEFAULT_URL = "http://127.0.0.1:9478"
DEFAULT_TOKEN_FILE = "/etc/stoker/hint-token"

log = logging.getLogger("stoker.hints")


class HintFailed(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _token(token: str | None, token_file: str | None) -> str:
    if token:
        return token
    if os.environ.get("STOKER_HINT_TOKEN"):
        return os.environ["STOKER_HINT_TOKEN"]
    path = token_file or os.environ.get("STOKER_HINT_TOKEN_FILE", DEFAULT_TOKEN_FILE)
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        raise HintFailed(f"cannot read the hint token from {path}: {exc.strerror}") from None


def send(action: str, body: dict, url: str | None = None, token: str | None = None,
         token_file: str | None = None, timeout: float = 2.0) -> dict:
    """POST one hint; raises `HintFailed` with the agent's message when it is refused."""
    base = (url or os.environ.get("STOKER_HINT_URL") or DEFAULT_URL).rstrip("/")
    request = urllib.request.Request(
        f"{base}/api/v1/checkpoints/{action}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {_token(token, token_file)}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise HintFailed(f"the agent refused the hint: {message}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise HintFailed(f"cannot reach the agent at {base}: {exc}") from None


def _target(path: str | None, mountpoint: str | None) -> dict:
    return {"mountpoint": mountpoint} if mountpoint else {"path": path}


def start(path: str | None = None, mountpoint: str | None = None, expected_bytes: int | None = None,
          **kwargs) -> dict:
    body = _target(path, mountpoint)
    if expected_bytes is not None:
        body["expected_bytes"] = expected_bytes
    return send("start", body, **kwargs)


def end(path: str | None = None, mountpoint: str | None = None, outcome: str = "completed", **kwargs) -> dict:
    return send("end", {**_target(path, mountpoint), "outcome": outcome}, **kwargs)


@contextmanager
def checkpoint(path: str | None = None, mountpoint: str | None = None, expected_bytes: int | None = None,
               **kwargs) -> Iterator[None]:
    """Wrap a checkpoint save: `completed` when the block returns, `aborted` when it raises."""
    try:
        start(path, mountpoint, expected_bytes, **kwargs)
    except HintFailed as exc:
        log.warning("stoker: checkpoint start hint not delivered: %s", exc)
    outcome = "aborted"
    try:
        yield
        outcome = "completed"
    finally:
        try:
            end(path, mountpoint, outcome, **kwargs)
        except HintFailed as exc:
            log.warning("stoker: checkpoint end hint not delivered: %s", exc)
