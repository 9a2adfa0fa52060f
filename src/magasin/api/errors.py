"""The one place where magasin's error tree becomes HTTP status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

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


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        {"error": "invalid_input", "detail": jsonable_encoder(exc.errors())}, status_code=422
    )


def install(app: FastAPI) -> None:
    """Every error answers `{"error": <code>, "detail": <message or list of problems>}`."""
    app.add_exception_handler(MagasinError, _magasin_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
