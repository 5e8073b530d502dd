"""The HTTP side: `/metrics` from memory, `/healthz` from the supervisor's view.

Handlers only read what the collectors already rendered, so a scrape costs a
dictionary lookup and a write, never a hardware read.
"""

from __future__ import annotations

from typing import Callable

from aiohttp import web

from stoker.exporters.exposition import CONTENT_TYPE, Exposition

LANDING = b"""<html><head><title>Stoker</title></head><body>
<h1>Stoker</h1><p>GPU starvation telemetry.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul>
</body></html>"""


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


async def serve(app: web.Application, host: str, port: int, ssl_context=None) -> web.AppRunner:
    """Request line and header fields are capped at 8 KiB, bodies at the app's client_max_size."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           max_line_size=8190, max_field_size=8190)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0 in tests)."""
    return runner.addresses[0][1]

