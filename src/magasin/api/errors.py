"""The one place where magasin's error tree becomes HTTP status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from magasin.shared.errors import (
    BusinessRuleViolation,
    Conflict,
    InvalidInput,
    MagasinError,
    NotFound,
    StorageError,
    Unavailable,
)

log = logging.getLogger("magasin.api")

STATUS: tuple[tuple[type[MagasinError], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (BusinessRuleViolation, 422, "business_rule_violation"),
    (InvalidInput, 400, "invalid_input"),
    (Unavailable, 503, "unavailable"),
    (StorageError, 500, "storage_error"),
)


def status_of(exc: MagasinError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"


async def _magasin_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MagasinError)
    status, code = status_of(exc)
    if status >= 500:
        log.error("%s %s failed: %r", request.method, request.url.path, exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": code, "detail": str(exc)}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(MagasinError, _magasin_error)
