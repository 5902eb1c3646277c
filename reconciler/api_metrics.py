"""`GET /metrics`: the daemon's Prometheus series (reconciler/metrics.py) for a scraper.

`api.make_app` adds the route; the middlewares apply as to every route, so a scraper that is
not on loopback sends the Bearer token (Prometheus: `authorization: {credentials_file: …}`)
and every answer carries `X-Correlation-Id`. The body is Prometheus text, or OpenMetrics when
the scraper's Accept header asks for it.
"""

from __future__ import annotations

from aiohttp import web

from reconciler.api import BACKEND


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", get_metrics)


async def get_metrics(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[BACKEND].metrics.exposition(request.headers.get("Accept", ""))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type  # with its version and charset
    response.headers["Cache-Control"] = "no-store"
    return response
