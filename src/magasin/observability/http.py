"""HTTP side of observability: the middleware every request passes (span, log context,
metrics) and the `/metrics` endpoint."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from magasin.observability import logging as logs
from magasin.observability import metrics, tracing

UNMATCHED = "<unmatched>"
"""Route label of requests no route matched: raw paths would make the label unbounded."""


class RequestObservability:
    """ASGI middleware: how each HTTP request is observed, in one layer. Its server span
    (when tracing is on), its log context and `X-Request-Id`, and its metrics (count and
    duration by method, route template and status, with the trace as exemplar).

    One layer and one wrapper around `send`, not one per concern: every chunk of a
    followed sale's event stream passes through it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app dies before answering
        context, request_id = logs.serving(scope)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        with tracing.server_span(scope, request_id) as span, context:
            try:
                await self.app(scope, receive, sending)
            finally:
                # The router stores the matched route in the scope it was given (this one).
                route = getattr(scope.get("route"), "path", None)
                tracing.end_server_span(span, scope["method"], route, status)
                metrics.http_request(scope["method"], route or UNMATCHED, status,
                                     time.perf_counter() - started)


async def scrape(request: Request) -> Response:
    """Prometheus exposition of this process's metrics; needs no API key (docs/metrics.md)."""
    body, content_type = metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


def install(app: FastAPI) -> None:
    """Add the request middleware and `GET /metrics` to `app`."""
    app.add_middleware(RequestObservability)
    app.add_api_route("/metrics", scrape, methods=["GET"], tags=["health"],
                      response_class=Response)
