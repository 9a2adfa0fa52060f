"""API-key authentication: every route but health needs a configured `X-API-Key`; the
Server-Sent Events routes also take a short-lived stream token, since a browser's
EventSource cannot send headers.

A stream token is `<key id>.<expiry>.<HMAC-SHA256 of both, keyed by the API key>`: it names
no key, cannot be turned back into one, opens a stream only within `STREAM_TOKEN_TTL_S` of
being issued, only on routes marked `STREAM_TOKEN_ALLOWED`, and dies with its key. Every
process holding the same keys checks it, so no secret or session is shared between them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from starlette.requests import HTTPConnection

STREAM_TOKEN_TTL_S = 60
STREAM_TOKEN_PARAM = "access_token"
STREAM_TOKEN_ALLOWED: dict[str, Any] = {
    "x-magasin-stream-token": True,
    "description": "Also accepts `?access_token=<stream token>` (POST /api/auth/stream-token) "
                   "instead of the X-API-Key header, for browsers' EventSource.",
}
"""`openapi_extra` of a route that accepts a stream token in place of the header."""
_TOKEN_CONTEXT = b"magasin stream token v1:"


def key_id(key: str) -> str:
    """A name for a key that reveals nothing of it (logs, tokens, `whoami`)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _mac(key: str, claim: str) -> str:
    return hmac.new(key.encode(), _TOKEN_CONTEXT + claim.encode(), hashlib.sha256).hexdigest()


def mint_stream_token(key: str, now: float, ttl: float = STREAM_TOKEN_TTL_S) -> str:
    claim = f"{key_id(key)}.{int(now + ttl)}"
    return f"{claim}.{_mac(key, claim)}"


def check_stream_token(token: str, keys: frozenset[str], now: float) -> str | None:
    """The key that issued `token`, if it is one of `keys` and the token has not expired."""
    ident, _, rest = token.partition(".")
    expiry, _, mac = rest.partition(".")
    if not expiry.isdigit() or int(expiry) < now:
        return None
    claim = f"{ident}.{expiry}"
    for key in keys:
        if secrets.compare_digest(key_id(key), ident) and secrets.compare_digest(
            _mac(key, claim), mac
        ):
            return key
    return None


def _takes_stream_token(request: HTTPConnection) -> bool:
    route = request.scope.get("route")
    extra = getattr(route, "openapi_extra", None) or {}
    return bool(extra.get("x-magasin-stream-token"))


class _ApiKeyHeader(APIKeyHeader):
    """The `X-API-Key` scheme (what OpenAPI documents, the docs' Authorize button) that also
    checks the key: one dependency a request, where a check depending on the header's
    reader made FastAPI solve two (a sale's two requests pay each level, issue 11)."""

    async def __call__(self, request: HTTPConnection) -> str:
        # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread
        # hop on every request for a check that takes microseconds.
        keys: frozenset[str] = request.app.state.api_keys | admin_keys_of(request)
        key = request.headers.get(self.model.name)
        if not key:
            token = request.query_params.get(STREAM_TOKEN_PARAM)
            if token is not None and _takes_stream_token(request):
                issuer = check_stream_token(token, keys, time.time())
                if issuer is None:
                    raise HTTPException(401, "invalid or expired stream token",
                                        {"WWW-Authenticate": "API-Key"})
                return issuer
            raise HTTPException(401, "missing X-API-Key header",
                                {"WWW-Authenticate": "API-Key"})
        if not any(secrets.compare_digest(key, known) for known in keys):
            raise HTTPException(401, "invalid API key", {"WWW-Authenticate": "API-Key"})
        return key


require_api_key = _ApiKeyHeader(name="X-API-Key", scheme_name="APIKeyHeader",
                                description="An API key.")
"""The dependency every route but health takes: the key (or the stream token's issuer)."""


ApiKey = Annotated[str, Depends(require_api_key)]


def parse_keys(text: str) -> frozenset[str]:
    """Keys of a comma-separated setting such as MAGASIN_ADMIN_API_KEYS."""
    return frozenset(k.strip() for k in text.split(",") if k.strip())


def admin_keys_of(request: HTTPConnection) -> frozenset[str]:
    keys: frozenset[str] = getattr(request.app.state, "admin_keys", frozenset())
    return keys


async def require_admin_key(request: Request, key: ApiKey) -> str:
    """An admin key (MAGASIN_ADMIN_API_KEYS, also valid as an ordinary key): 403 for any
    other valid key, 401 for no or an unknown key."""
    if not is_admin(request, key):
        raise HTTPException(403, "this operation needs an admin API key")
    return key


AdminKey = Annotated[str, Depends(require_admin_key)]


def is_admin(request: Request, key: str) -> bool:
    return any(secrets.compare_digest(key, admin) for admin in admin_keys_of(request))


class Identity(BaseModel):
    key_id: str
    """sha256 of the key, first 16 hex digits."""
    admin: bool
    """Whether this key may run admin operations (force a saga's compensation)."""


class StreamToken(BaseModel):
    token: str
    expires_in: int
    """Seconds left to open a stream with it; an open stream is not cut when it expires."""
    parameter: str = STREAM_TOKEN_PARAM


def router() -> APIRouter:
    """What a client learns about its own key (include with `require_api_key`)."""
    api = APIRouter(prefix="/api/auth", tags=["auth"])

    @api.get("/whoami")
    async def whoami(request: Request, key: ApiKey) -> Identity:
        """Which key this is (by id) and whether it is an admin key."""
        return Identity(key_id=key_id(key), admin=is_admin(request, key))

    @api.post("/stream-token")
    async def stream_token(key: ApiKey) -> StreamToken:
        """A token that opens a Server-Sent Events stream as this key, within a minute,
        passed as `?access_token=` (for clients that cannot send the header)."""
        return StreamToken(token=mint_stream_token(key, time.time()),
                           expires_in=STREAM_TOKEN_TTL_S)

    return api
