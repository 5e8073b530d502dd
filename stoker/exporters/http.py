"""The HTTP side: `/metrics` from memory, `/healthz` from the supervisor's view.

Handlers only read what the collectors already rendered, so a scrape costs a
dictionary lookup and a write, never a hardware read.

Every listener is guarded, because a TCP connection holds a file descriptor
whether or not it ever sends a request, and the collectors need descriptors
too (sysfs reads, NVML, the probes' pipes). Left alone, a thousand idle
connections exhaust a service's default limit of 1,024: /metrics stops
answering, collectors fail with "Too many open files", and asyncio logs a
traceback per failed accept(). So: a cap on connections (a quarter of the
descriptor limit at most) that TLS handshakes in progress count against, a
deadline for the first request header (the TLS handshake included), aiohttp's
keep-alive timeout between requests, the soft descriptor limit raised to the
hard one, a kernel accept queue long enough that a connect flood does not make
a scraper's connection wait for a SYN retransmission, and the event loop's and
aiohttp's own error reports sent through a repeat gate.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import resource
import socket
import ssl
import sys
from asyncio import sslproto
from collections import OrderedDict
from typing import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

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
SHUTDOWN_TIMEOUT = 1.0
"""At shutdown, a request in progress gets this long to finish before it is cancelled (a login waiting
for bcrypt among them); a scrape takes milliseconds, and the next one goes to the new process."""
MAX_HOLD_BACK = 10
"""Seconds at most that an answer with Retry-After is held back (see ConnectionGuard.middleware)."""
LISTEN_BACKLOG = 4096
"""Connections the kernel queues until the loop accepts them: Linux's default cap (net.core.somaxconn).
A queued connection costs kernel memory, not a descriptor of the process; a short queue overflows in a
connect flood, and the kernel then drops the scraper's SYN too, which it resends only after a second."""


def make_app(exposition: Exposition, stale: Callable[[], list[str]]) -> web.Application:
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

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", landing)
    return app


class _Connection(asyncio.Protocol):
    """One accepted connection, between asyncio and aiohttp's protocol: the guard sees it arrive,
    go busy and idle, and leave. Nothing else is made for it before its first bytes arrive, which a
    flood of clients that never send anything does not need: with TLS, the TLS layer then (the bytes
    are the client's hello; connection_made is called again once the handshake is done, with the TLS
    transport), and aiohttp's protocol, which starts a task, for the first bytes of a request."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.transport: asyncio.BaseTransport | None = None
        """The TCP transport, then the TLS transport over it once the handshake is done."""
        self.encrypted = False
        """The TLS layer is set up (not referred to here: it refers to this connection)."""
        self.handler: asyncio.Protocol | None = None
        self.deadline: asyncio.TimerHandle | None = None
        """Pending until the first request arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self.transport = transport
            if not self.guard.admit(self):
                transport.abort()
        else:
            self.guard.moved(self, transport)

    def data_received(self, data: bytes) -> None:
        if self.guard.tls is not None and not self.encrypted:
            self.encrypted = True
            _TLS(self, self.guard.tls, self.guard.header_timeout).take_over(self.transport, data)
            return
        if self.handler is None:
            self.handler = self.guard.protocol()
            self.handler.connection_made(self.transport)
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


class _TLS(sslproto.SSLProtocol):
    """asyncio's TLS layer, started by the guard on an admitted connection that has sent its first
    bytes (not by the event loop at accept, where no cap applies), with a 16 KiB read buffer
    instead of 256 KiB.

    asyncio allocates and zeroes that buffer for every TLS connection when it is accepted: 1,000
    clients that connect and never finish a handshake took the agent from 47 to 260 MB, and glibc
    kept 225 MB of it after they ended. A TLS record is at most 16 KiB; a larger buffer only saves
    a read call."""

    max_size = 16 * 1024

    def __init__(self, conn: _Connection, context: ssl.SSLContext, timeout: float):
        super().__init__(asyncio.get_running_loop(), conn, context, None, server_side=True,
                         ssl_handshake_timeout=timeout, ssl_shutdown_timeout=timeout)
        self._conn = conn

    def take_over(self, transport: asyncio.Transport, first: bytes) -> None:
        """As loop.start_tls() does, then the bytes the TCP protocol already got, through the
        buffer asyncio would have read them into."""
        transport.set_protocol(self)
        self.connection_made(transport)
        pending = memoryview(first)
        while pending and not transport.is_closing():
            buffer = self.get_buffer(len(pending))
            n = min(len(buffer), len(pending))
            buffer[:n] = pending[:n]
            pending = pending[n:]
            self.buffer_updated(n)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._conn.guard.forget(self._conn)  # a failed handshake never reaches the connection's own
        self._conn = None  # it refers to this through its TLS transport: freed now, not by the collector


class ConnectionGuard:
    """A listener's protocol factory: at most `limit` connections, and a deadline for the first request.

    At the limit a new connection displaces the idle one heard from least recently (idle: no
    request in progress, because none has arrived yet, its TLS handshake is not done, or it waits
    between requests); only when every connection is in the middle of a request is the newcomer
    turned away. So a flood of idle, slow or handshaking clients holds at most `limit`
    descriptors, each for at most `header_timeout`, while a scraper that connects and asks at
    once still gets its answer. (A request waits in a handler for long only for a login's bcrypt
    check, and those are few at a time: see basicauth.py.)"""

    def __init__(self, runner: web.AppRunner, limit: int, header_timeout: float, name: str,
                 tls: ssl.SSLContext | None = None):
        self._runner = runner
        self.limit = limit
        self.header_timeout = header_timeout
        self.tls = tls
        self._name = name
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self._idle: OrderedDict[_Connection, None] = OrderedDict()  # heard from least recently first
        self._gate = logs.RepeatGate()
        self._flooded = False
        """Over half the limit were open: memory is handed back once they are gone."""

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
        self._flooded = self._flooded or len(self._open) > self.limit // 2
        conn.deadline = asyncio.get_running_loop().call_later(self.header_timeout, self._expire, conn)
        return True

    def moved(self, conn: _Connection, transport: asyncio.BaseTransport) -> None:
        """The handshake is done: requests arrive on the TLS transport from now."""
        if self._open.pop(conn.transport, None) is not None:
            self._open[transport] = conn
        conn.transport = transport

    def heard_from(self, conn: _Connection) -> None:
        """Bytes arrived: the last to be displaced (a request may be on its way to the handler)."""
        if conn in self._idle:
            self._idle.move_to_end(conn)

    def forget(self, conn: _Connection) -> None:
        if self._open.pop(conn.transport, None) is not None:
            self._idle.pop(conn, None)
            if conn.deadline is not None:
                conn.deadline.cancel()
            if self._flooded and len(self._open) <= self.limit // 16:
                self._flooded = False
                asyncio.get_running_loop().call_soon(release_memory)

    def close(self) -> None:
        """Drop every connection left (at shutdown, after aiohttp closed those it knows)."""
        for conn in list(self._open.values()):
            self._drop(conn)

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
            response = await handler(request)
        finally:
            if conn.transport in self._open:
                self._idle[conn] = None  # idle from now: the last to be displaced
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.isdigit():
            # Told to come back in N seconds, the client gets that answer N seconds later, its connection
            # idle meanwhile: a loop that would not wait (a password guesser's, answered 429 without
            # bcrypt) asks once per N seconds per connection, not as fast as the loop can answer.
            await asyncio.sleep(min(int(retry_after), MAX_HOLD_BACK))
        return response


class _RequestLog:
    """Stands in for aiohttp's server logger, which writes every request it cannot parse with its
    traceback (9 lines through the logging module's last resort, no gate): a client sending
    malformed requests wrote 23,408 of them, 16 MB, in 10 s. Here each kind of failure is one
    structured line through a repeat gate: a request aiohttp could not parse is the client's
    mistake, logged as `bad request` without a traceback; anything else is a bug, logged as
    `request failed` with it."""

    def __init__(self, listener: str):
        self._listener = listener
        self._gate = logs.RepeatGate()

    def debug(self, *args, **kwargs) -> None:
        """aiohttp's debug lines (a first request that is not HTTP at all, as from a port scanner)."""

    def warning(self, msg: str, *args, **kwargs) -> None:
        self._write(msg % args if args else msg, None)

    def exception(self, msg: str, *args, exc_info=None, **kwargs) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        self._write(msg % args if args else msg, exc)

    def _write(self, detail: str, exc: BaseException | None) -> None:
        kind = type(exc).__name__ if exc is not None else detail
        suppressed = self._gate.admit((kind,), kind)
        if suppressed is None:
            return
        if isinstance(exc, HttpProcessingError):
            log.warning("bad request", listener=self._listener, detail=detail, error=f"{kind}: {exc.message!r}",
                        repeated=suppressed)
        else:
            log.error("request failed", listener=self._listener, detail=detail, repeated=suppressed,
                      **({"error": f"{kind}: {exc}", "exc_info": exc} if exc is not None else {}))


class Listener:
    """A guarded listening socket and the aiohttp runner behind it."""

    def __init__(self, server: asyncio.AbstractServer, runner: web.AppRunner, guard: ConnectionGuard):
        self._server = server
        self._runner = runner
        self._guard = guard

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0 in tests)."""
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        await self._runner.cleanup()
        self._guard.close()


async def serve(app: web.Application, host: str, port: int, ssl_context=None, *,
                max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT,
                idle_timeout: float = IDLE_TIMEOUT) -> Listener:
    """Serve `app` on host:port behind a ConnectionGuard (its middleware goes first in the app).
    Request line and header fields are capped at 8 KiB, bodies at the app's client_max_size."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = max_connections if soft == resource.RLIM_INFINITY else max(1, min(max_connections, soft // 4))
    name = f"{host}:{port}"
    runner = web.AppRunner(app, access_log=None, handle_signals=False, max_line_size=8190,
                           max_field_size=8190, keepalive_timeout=idle_timeout, shutdown_timeout=SHUTDOWN_TIMEOUT,
                           logger=_RequestLog(name))
    guard = ConnectionGuard(runner, limit, header_timeout, name, ssl_context)
    app.middlewares.insert(0, guard.middleware)
    await runner.setup()
    try:
        # asyncio accepts up to `backlog` connections per loop pass and listens with the same number. The
        # first bounds descriptors in a flood: a connection is admitted two passes after its accept() and a
        # displaced one closes a pass later, so a flood holds the limit plus three batches (5/16 of the
        # files; the kept sysfs files hold up to another quarter, a simulated node in the process 3/8).
        # The second costs only kernel memory, so the socket listens again with a long queue.
        server = await asyncio.get_running_loop().create_server(
            guard, host, port, backlog=max(8, limit // 16), reuse_address=True)
        for sock in server.sockets:
            with socket.socket(fileno=os.dup(sock.fileno())) as same:
                same.listen(LISTEN_BACKLOG)
    except BaseException:
        await runner.cleanup()
        raise
    return Listener(server, runner, guard)


def release_memory() -> None:
    """Free what a flood's connections left, and hand the heap's free pages back to the kernel.

    asyncio's transports refer to themselves (the bound method they read with), so a closed one
    waits for the cycle collector, for a full collection once it has lived a while. glibc keeps
    freed blocks in its arenas for reuse: after a flood of TLS handshakes (OpenSSL's state and
    buffers, tens of KB a connection) the agent stayed 16 MB larger, 225 MB before the TLS layer
    moved into the guard. malloc_trim hands them back (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
