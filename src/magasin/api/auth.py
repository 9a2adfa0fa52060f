"""API-key authentication: every route but health needs a configured `X-API-Key`."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


async def require_api_key(
    request: Request, key: Annotated[str | None, Depends(_header)]
) -> str:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop
    # on every request for a check that takes microseconds.
    keys: frozenset[str] = request.app.state.api_keys
    if key is None:
        raise HTTPException(401, "missing X-API-Key header", {"WWW-Authenticate": "API-Key"})
    if not any(secrets.compare_digest(key, known) for known in keys):
        raise HTTPException(401, "invalid API key", {"WWW-Authenticate": "API-Key"})
    return key


ApiKey = Annotated[str, Depends(require_api_key)]
