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
    keys: frozenset[str] = request.app.state.api_keys | admin_keys_of(request)
    if key is None:
        raise HTTPException(401, "missing X-API-Key header", {"WWW-Authenticate": "API-Key"})
    if not any(secrets.compare_digest(key, known) for known in keys):
        raise HTTPException(401, "invalid API key", {"WWW-Authenticate": "API-Key"})
    return key


ApiKey = Annotated[str, Depends(require_api_key)]


def parse_keys(text: str) -> frozenset[str]:
    """Keys of a comma-separated setting such as MAGASIN_ADMIN_API_KEYS."""
    return frozenset(k.strip() for k in text.split(",") if k.strip())


def admin_keys_of(request: Request) -> frozenset[str]:
    keys: frozenset[str] = getattr(request.app.state, "admin_keys", frozenset())
    return keys


async def require_admin_key(request: Request, key: ApiKey) -> str:
    """An admin key (MAGASIN_ADMIN_API_KEYS, also valid as an ordinary key): 403 for any
    other valid key, 401 for no or an unknown key."""
    if not any(secrets.compare_digest(key, admin) for admin in admin_keys_of(request)):
        raise HTTPException(403, "this operation needs an admin API key")
    return key


AdminKey = Annotated[str, Depends(require_admin_key)]
