"""The FastAPI application of a runtime: its services' routes behind API keys, health and
metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from magasin import __version__
from magasin.api import auth, deadletters, errors
from magasin.api.auth import parse_keys, require_api_key
from magasin.bootstrap import Runtime
from magasin.console import routes as console
from magasin.observability import http as observability_http
from magasin.projections.api import router as projections_router
from magasin.shared.errors import MagasinError


def create_app(runtime: Runtime, keys: frozenset[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="magasin",
        version=__version__,
        description="Event-driven backend for a chain of retail stores.",
        lifespan=lifespan,
    )
    app.state.api_keys = keys
    app.state.admin_keys = parse_keys(runtime.settings.admin_api_keys)
    app.state.runtime = runtime
    errors.install(app)
    observability_http.install(app)
    for service in runtime.services:
        if service.router is not None:
            app.include_router(service.router, dependencies=[Depends(require_api_key)])
    app.include_router(projections_router(runtime.store), dependencies=[Depends(require_api_key)])
    app.include_router(deadletters.router(runtime.bus), dependencies=[Depends(require_api_key)])
    app.include_router(auth.router(), dependencies=[Depends(require_api_key)])
    # The console is static files that call the API above like any client (no data, no key).
    app.include_router(console.router(runtime.settings))

    @app.get("/health", tags=["health"])
    async def health() -> JSONResponse:
        """Liveness and readiness; needs no API key."""
        body: dict[str, Any] = {
            "status": "ok", "version": __version__, "mode": runtime.mode,
            "services": [s.name for s in runtime.services],
        }
        try:
            body["event_log_position"] = await runtime.store.last_position()
        except MagasinError as exc:
            body.update(status="degraded", store_error=str(exc))
        if runtime.starting:
            body["status"] = "starting"
        # What services add (the bank's circuit breaker, say) informs, it does not fail the
        # check: an open breaker is the service coping with an outage, not a sick process.
        checks = {s.name: dict(s.health()) for s in runtime.services if s.health is not None}
        if checks:
            body["checks"] = checks
        # Sampled every MAGASIN_METRICS_SAMPLE_S by the metrics loop: /health stays free of
        # queries, which a gateway's health checks may make often.
        body.update(runtime.last_sample)
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    return app
