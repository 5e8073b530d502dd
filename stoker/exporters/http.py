"""The HTTP side: `/metrics` from memory, `/healthz` from the supervisor's view.

Handlers only read what the collectors already rendered, so a scrape costs a
dictionary lookup and a write, never a hardware read.

Every listener is guarded, because a TCP connection holds a file descriptor
whether or not it ever sends a request, and the collectors need descriptors
too (sysfs reads, NVML, the probes' pipes). Left alone, a thousand idle
connections exhaust a service's default limit of 1,024: /metrics stops
answering, collectors fail with "Too many open files", and asyncio logs a
traceback per failed accept(). So: a cap on connections (a quarter of the
descriptor limit at most), a deadline for the first request header (the TLS
handshake included), aiohttp's keep-alive timeout between requests, the soft
descriptor limit raised to the hard one, and the event loop's own error
reports sent through a repeat gate.
"""

from __future__ import annotations

import asyncio
import resource
from collections import OrderedDict
from typing import Callable

from aiohttp import web

from stoker import logs
from stoker.exporters.exposition import CONTENT_TYPE, Exposition

log = logs.get("http")

LANDING = b"""<html><head><title>Stoker</title></head><body>
<h1>Stoker</h1><p>GPU starvation telemetry.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul>
</body></html>"""

MAX_CONNECTIONS = 256
"""Per listener, and never more than a quarter of the descriptor limit: a Prometheus HA pair
and a few people with curl need a handful."""
HEADER_TIMEOUT = 5.0
"""A new connection must deliver a complete request header within this, TLS handshake included;
a scraper sends its request at once."""
IDLE_TIMEOUT = 5.0
"""A kept-alive connection without a new request for this long is closed (the next scrape reconnects)."""


def make_app(exposition: Exposition, stale: Callable[[], list[str]], middlewares=()) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp = web.Response(body=exposition.gzipped(), headers={"Content-Encoding": "gzip"})
        else:
            resp = web.Response(body=exposition.body())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def healthz(request: web.Request) -> web.Response:
        names = stale()
        if names:
            return web.json_response({"status": "stale", "stale_collectors": names}, status=503)
        return web.json_response({"status": "ok"})

    async def landing(request: web.Request) -> web.Response:
        return web.Response(body=LANDING, content_type="text/html")

    app = web.Application(client_max_size=64 * 1024, middlewares=list(middlewares))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", landing)
    return app


class _Connection(asyncio.Protocol):
    """One accepted connection, between asyncio and aiohttp's protocol: the guard sees it arrive,
    go busy and idle, and leave; aiohttp gets it only once admitted."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.transport: asyncio.BaseTransport | None = None
        self.handler: asyncio.Protocol | None = None
        self.deadline: asyncio.TimerHandle | None = None
        """Pending until the first request arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.guard.admit(self):
            transport.abort()
            return
        self.handler = self.guard.protocol()
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.guard.heard_from(self)
            self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)


class ConnectionGuard:
    """A listener's protocol factory: at most `limit` connections, and a deadline for the first request.

    At the limit a new connection displaces the idle one heard from least recently (idle: no
    request in progress, because none has arrived yet or it waits between requests); only when
    every connection is in the middle of a request is the newcomer turned away. So a flood of
    idle or slow clients holds at most `limit` descriptors, each for at most `header_timeout`,
    while a scraper that connects and asks at once still gets its answer."""

    def __init__(self, runner: web.AppRunner, limit: int, header_timeout: float, name: str):
        self._runner = runner
        self.limit = limit
        self._header_timeout = header_timeout
        self._name = name
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self._idle: OrderedDict[_Connection, None] = OrderedDict()  # heard from least recently first
        self._gate = logs.RepeatGate()

    def __call__(self) -> _Connection:
        return _Connection(self)

    def protocol(self) -> asyncio.Protocol:
        """aiohttp's protocol for an admitted connection (the runner's server is its factory)."""
        return self._runner.server()

    def admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self.limit:
            if not self._idle:
                self._report("every connection is busy; refusing a new one")
                return False
            self._drop(next(iter(self._idle)))
            self._report("displacing the idle connection heard from least recently")
        self._open[conn.transport] = conn
        self._idle[conn] = None
        conn.deadline = asyncio.get_running_loop().call_later(self._header_timeout, self._expire, conn)
        return True

    def heard_from(self, conn: _Connection) -> None:
        """Bytes arrived: the last to be displaced (a request may be on its way to the handler)."""
        if conn in self._idle:
            self._idle.move_to_end(conn)

    def forget(self, conn: _Connection) -> None:
        if self._open.pop(conn.transport, None) is not None:
            self._idle.pop(conn, None)
            if conn.deadline is not None:
                conn.deadline.cancel()

    def _drop(self, conn: _Connection) -> None:
        """Close now: abort() frees the descriptor on the next loop pass, with no TLS goodbye to wait for."""
        self.forget(conn)
        conn.transport.abort()

    def _expire(self, conn: _Connection) -> None:
        conn.deadline = None
        if conn in self._idle:  # no request yet
            self._drop(conn)

    def _report(self, what: str) -> None:
        suppressed = self._gate.admit((what,), what)
        if suppressed is not None:
            log.warning("connection limit reached", listener=self._name, limit=self.limit, action=what,
                        repeated=suppressed)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Marks the connection busy while a request is handled (not to be displaced), idle after."""
        conn = self._open.get(request.transport)
        if conn is None:
            return await handler(request)
        self._idle.pop(conn, None)
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None
        try:
            return await handler(request)
        finally:
            if conn.transport in self._open:
                self._idle[conn] = None  # idle from now: the last to be displaced


class Listener:
    """A guarded listening socket and the aiohttp runner behind it."""

    def __init__(self, server: asyncio.AbstractServer, runner: web.AppRunner):
        self._server = server
        self._runner = runner

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0 in tests)."""
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        await self._runner.cleanup()


async def serve(app: web.Application, host: str, port: int, ssl_context=None, *,
                max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT,
                idle_timeout: float = IDLE_TIMEOUT) -> Listener:
    """Serve `app` on host:port behind a ConnectionGuard (its middleware goes first in the app).
    Request line and header fields are capped at 8 KiB, bodies at the app's client_max_size."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = max_connections if soft == resource.RLIM_INFINITY else max(1, min(max_connections, soft // 4))
    # the event loop accepts up to `backlog` connections at a time, and a displaced connection's descriptor
    # closes one pass later: a flood holds the limit plus twice the backlog, not more than 3/8 of the files
    # (the kept sysfs files hold up to another quarter, a simulated node in the process an eighth)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, max_line_size=8190,
                           max_field_size=8190, keepalive_timeout=idle_timeout)
    guard = ConnectionGuard(runner, limit, header_timeout, f"{host}:{port}")
    app.middlewares.insert(0, guard.middleware)
    await runner.setup()
    try:
        server = await asyncio.get_running_loop().create_server(
            guard, host, port, ssl=ssl_context, ssl_handshake_timeout=header_timeout if ssl_context else None,
            backlog=min(128, max(8, limit // 4)), reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    return Listener(server, runner)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one, and return the soft limit in force.

    systemd's default is 1,024 soft (524,288 hard) and the unit sets LimitNOFILE; this covers
    the agent run by hand or by another supervisor. Headroom, not the defence: the connection
    cap is. A hard limit the kernel will not grant as soft (unlimited) leaves things as they are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def log_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Send the event loop's own error reports (a failed accept(), an exception in a callback)
    to the structured log through a repeat gate. asyncio reports an accept() that fails with
    EMFILE once per pending connection and retries every second; unfiltered that was 350,000
    tracebacks in 25 s."""
    gate = logs.RepeatGate()

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = context.get("message", "")
        exc = context.get("exception")
        suppressed = gate.admit((message,), repr(exc))
        if suppressed is None:
            return
        details = {"exc_info": exc} if exc is not None and not isinstance(exc, OSError) else {}
        log.error("event loop error", message=message, error=str(exc) if exc is not None else None,
                  repeated=suppressed, **details)

    loop.set_exception_handler(handle)
