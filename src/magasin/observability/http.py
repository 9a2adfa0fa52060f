"""HTTP side of the metrics: the request-metrics middleware and the `/metrics` endpoint."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from magasin.observability import metrics

UNMATCHED = "<unmatched>"
"""Route label of requests no route matched: raw paths would make the label unbounded."""


class RequestMetrics:
    """Counts and times each HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app dies before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router stores the matched route in the scope it was given (this one).
            route = getattr(scope.get("route"), "path", UNMATCHED)
            metrics.http_request(scope["method"], route, status, time.perf_counter() - started)


async def scrape(request: Request) -> Response:
    """Prometheus exposition of this process's metrics; needs no API key (docs/metrics.md)."""
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


def install(app: FastAPI) -> None:
    """Add the request-metrics middleware and `GET /metrics` to `app`."""
    app.add_middleware(RequestMetrics)
    app.add_api_route("/metrics", scrape, methods=["GET"], tags=["health"],
                      response_class=Response)
