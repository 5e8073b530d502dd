"""The checkpoint hint API: the training job tells the agent a checkpoint starts and ends.

Served on its own listener (loopback by default), apart from /metrics, and
only to callers holding the bearer token from the configured file. Anything
wrong with a request (not UTF-8 JSON, nested too deeply, a number too large, a
missing field) is the caller's fault: a 400 with a message that says what to
send, never a 500 and a traceback.
"""

from __future__ import annotations

import codecs
import hmac
import json

from aiohttp import web

from stoker.detect.checkpoint import CheckpointTracker, HintError

OUTCOMES = ("completed", "aborted")
MAX_BODY = 16 * 1024
MAX_EXPECTED_BYTES = 2**63 - 1
"""9 EB, more than any checkpoint; it ends up in a float gauge, which a 400-digit integer would break."""


def make_hint_app(tracker: CheckpointTracker, token: str) -> web.Application:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def require_token(request: web.Request, handler):
        given = request.headers.get("Authorization", "").encode()
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

    app = web.Application(middlewares=[require_token], client_max_size=MAX_BODY)
    app.router.add_post("/api/v1/checkpoints/start", start)
    app.router.add_post("/api/v1/checkpoints/end", end)
    return app


def _codec(charset: str) -> str | None:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


def _http(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound, 409: web.HTTPConflict}.get(status, web.HTTPBadRequest)
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def _bad(message: str) -> web.HTTPException:
    return _http(400, message)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
