"""The hint API: the training job tells the agent a checkpoint starts and ends, and its steps.

Served on its own listener (loopback by default), apart from /metrics, and
only to callers holding the bearer token from the configured file. Anything
wrong with a request (not UTF-8 JSON, nested too deeply, a number too large, a
missing field) is the caller's fault: a 400 with a message that says what to
send, never a 500 and a traceback.

Steps (`POST /api/v1/steps`, docs/JOBS.md) come in batches from the
`stoker.hints` helper's background thread:

    {"job": "4242", "run": "4242.0.0", "pid": 81231, "gpus": ["GPU-..."], "scheduler": "slurm", "nodes": 16,
     "steps": [{"step": 1200, "seconds": 1.92, "tokens": 4194304, "samples": 1024, "data_wait": 0.04}, ...]}

Only `steps` is required (each with its `step`); the answer names the job
they were counted for and how many were new. Which job that is, and what is
refused (409: the `pid` is a GPU process of another job, or a new run from the
processes of the job's current one; 429: new runs too often; 400: a step too
far ahead of its run), is the ledger's rule (detect/goodput.py, docs/JOBS.md).
The listener is TCP, which carries no peer credentials: `pid` is the sender's
word, checked against what the node shows, not proven. `nodes` (the nodes the
job spans) and each step's `data_wait` (of its `seconds`, the time it waited
for its next batch) are optional (detect/peer.py uses them).
"""

from __future__ import annotations

import codecs
import hmac
import json
import math

from aiohttp import web

from stoker.detect.checkpoint import CheckpointTracker, HintError
from stoker.detect.goodput import SCHEDULERS, GoodputLedger, StepRecord
from stoker.sources.jobs import JOB_ID

OUTCOMES = ("completed", "aborted")
MAX_BODY = 16 * 1024
MAX_EXPECTED_BYTES = 2**63 - 1
"""9 EB, more than any checkpoint; it ends up in a float gauge, which a 400-digit integer would break."""
MAX_STEPS = 256
"""Steps in one request; the helper sends at most 128 (the body limit holds about 200)."""
MAX_STEP_NUMBER = 2**53
"""Exact in a float, which `stoker_job_last_step` is; a billion times more steps than any training run takes."""
MAX_COUNT = 2**53
"""Tokens or samples of one step: exact in a float, beyond any global batch."""
MAX_STEP_SECONDS = 7 * 86400.0
MAX_GPUS = 64
MAX_NODES = 100_000


def make_hint_app(tracker: CheckpointTracker, token: str, ledger: GoodputLedger | None = None) -> web.Application:
    """`ledger`: where step hints go (detect/goodput.py); without it there is no step endpoint."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def require_token(request: web.Request, handler):
        # a field's bytes that are not UTF-8 reach here as lone surrogates: back to those bytes, never a 500
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="stoker"'})
        return await handler(request)

    async def body_of(request: web.Request) -> dict:
        """The body as a JSON object. JSON is UTF-8 (RFC 8259): another charset is refused
        rather than looked up (`charset=bogus` would be a LookupError)."""
        charset = request.charset
        if charset is not None and _codec(charset) != "utf-8":
            raise _bad(f"charset {charset!r} is not supported: send UTF-8 JSON")
        try:
            body = json.loads(await request.read())
        except RecursionError:
            raise _bad("body is not JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
            raise _bad(f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("body must be a JSON object")
        return body

    def target(body: dict) -> str:
        mountpoint, path = body.get("mountpoint"), body.get("path")
        for key, value in (("mountpoint", mountpoint), ("path", path)):
            if value is not None and (not isinstance(value, str) or not value.startswith("/")):
                raise _bad(f"`{key}` must be an absolute path")
        try:
            return tracker.resolve(mountpoint, path)
        except HintError as exc:
            raise _http(exc.status, str(exc)) from None

    async def start(request: web.Request) -> web.Response:
        body = await body_of(request)
        expected = body.get("expected_bytes")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)
                                     or not 0 <= expected <= MAX_EXPECTED_BYTES):
            raise _bad(f"`expected_bytes` must be an integer from 0 to {MAX_EXPECTED_BYTES}")
        mountpoint = target(body)
        tracker.hint_start(mountpoint, expected)
        return web.json_response({"mountpoint": mountpoint, "status": "in_progress"})

    async def end(request: web.Request) -> web.Response:
        body = await body_of(request)
        outcome = body.get("outcome")
        if outcome not in OUTCOMES:
            raise _bad(f"`outcome` must be one of {', '.join(OUTCOMES)}")
        mountpoint = target(body)
        try:
            tracker.hint_end(mountpoint, outcome)
        except HintError as exc:
            raise _http(exc.status, str(exc)) from None
        m = tracker.mounts[mountpoint]
        return web.json_response({"mountpoint": mountpoint, "written_bytes": m.written_bytes,
                                  "duration_seconds": m.last_duration})

    async def steps(request: web.Request) -> web.Response:
        body = await body_of(request)
        records = _steps(body.get("steps"))
        job, run, scheduler = (_text(body, key) for key in ("job", "run", "scheduler"))
        if job is not None and not JOB_ID.fullmatch(job):
            raise _bad("`job` must be 1-128 characters of letters, digits and ._:@+/-")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise _bad(f"`scheduler` must be one of {', '.join(SCHEDULERS)}")
        pid = body.get("pid")
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31):
            raise _bad("`pid` must be a process id")
        nodes = body.get("nodes")
        if nodes is not None and not (_integer(nodes, MAX_NODES) and nodes > 0):
            raise _bad(f"`nodes` must be an integer from 1 to {MAX_NODES}")
        gpus = body.get("gpus", [])
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS or not all(
                isinstance(g, str) and 0 < len(g) <= 128 and g.isprintable() for g in gpus):
            raise _bad(f"`gpus` must be a list of at most {MAX_GPUS} GPU UUIDs or indexes")
        try:
            job_id, accepted, duplicates = ledger.record_steps(records, job, run, pid, gpus, scheduler, nodes)
        except HintError as exc:
            raise _http(exc.status, str(exc)) from None
        return web.json_response({"job": job_id, "accepted": accepted, "duplicates": duplicates})

    app = web.Application(middlewares=[require_token], client_max_size=MAX_BODY)
    app.router.add_post("/api/v1/checkpoints/start", start)
    app.router.add_post("/api/v1/checkpoints/end", end)
    if ledger is not None:
        app.router.add_post("/api/v1/steps", steps)
    return app


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 128 or not value.isprintable()):
        raise _bad(f"`{key}` must be a string of 1-128 printable characters")
    return value


def _integer(value, top: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= top


def _steps(steps) -> list[StepRecord]:
    """The `steps` list, each checked: a step number, and optional seconds, tokens and samples."""
    if not isinstance(steps, list) or not 0 < len(steps) <= MAX_STEPS:
        raise _bad(f"`steps` must be a list of 1 to {MAX_STEPS} steps")
    out = []
    for i, s in enumerate(steps):
        if not isinstance(s, dict):
            raise _bad(f"`steps[{i}]` must be an object")
        number, seconds = s.get("step"), s.get("seconds")
        if not _integer(number, MAX_STEP_NUMBER):
            raise _bad(f"`steps[{i}].step` must be an integer from 0 to {MAX_STEP_NUMBER}")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not math.isfinite(seconds) or not 0 <= seconds <= MAX_STEP_SECONDS):
            raise _bad(f"`steps[{i}].seconds` must be a number of seconds from 0 to {MAX_STEP_SECONDS:g}")
        for key in ("tokens", "samples"):
            if s.get(key) is not None and not _integer(s[key], MAX_COUNT):
                raise _bad(f"`steps[{i}].{key}` must be an integer from 0 to {MAX_COUNT}")
        wait = s.get("data_wait")  # of `seconds`: waiting for the next batch (optional)
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, (int, float))
                                 or not math.isfinite(wait) or not 0 <= wait <= MAX_STEP_SECONDS):
            raise _bad(f"`steps[{i}].data_wait` must be a number of seconds from 0 to {MAX_STEP_SECONDS:g}")
        out.append(StepRecord(number, None if seconds is None else float(seconds), s.get("tokens"), s.get("samples"),
                              None if wait is None else float(wait)))
    return out


def _codec(charset: str) -> str | None:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


def _http(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound, 409: web.HTTPConflict,
           429: web.HTTPTooManyRequests, 503: web.HTTPServiceUnavailable}.get(status, web.HTTPBadRequest)
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def _bad(message: str) -> web.HTTPException:
    return _http(400, message)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
