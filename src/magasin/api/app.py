"""The FastAPI application of a runtime: its services' routes behind API keys, and health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from magasin import __version__
from magasin.api import errors
from magasin.api.auth import require_api_key
from magasin.bootstrap import Runtime
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
    app.state.runtime = runtime
    errors.install(app)
    for service in runtime.services:
        if service.router is not None:
            app.include_router(service.router, dependencies=[Depends(require_api_key)])

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
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    return app
