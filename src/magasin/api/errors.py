"""The one place where magasin's error tree becomes HTTP status codes."""

from __future__ import annotations

import logging
from typing import Any

import orjson
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


MAX_ECHO = 200
"""Characters of an offending input echoed back in a 422 (of its JSON when not a string)."""
MAX_PROBLEMS = 20
"""Problems listed in a 422; `more_problems` counts the rest."""


def _echo(value: Any) -> Any:
    """An offending input as a 422 shows it: whole when short, else its start and its
    length, so that a huge field is not sent back whole (nor logged by every proxy)."""
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    if len(text) <= MAX_ECHO:
        return value
    return f"{text[:MAX_ECHO]}…(truncated, {len(text)} chars)"


def _problem(error: dict[str, Any]) -> dict[str, Any]:
    problem = dict(error)
    # A field's name is input too (an unknown 100,000-character key is in `loc`).
    problem["loc"] = [_echo(part) for part in problem.get("loc", ())]
    if "input" in problem:
        problem["input"] = _echo(problem["input"])
    if "ctx" in problem:
        problem["ctx"] = {k: _echo(v) for k, v in problem["ctx"].items()}
    return problem


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = jsonable_encoder(exc.errors())
    body: dict[str, Any] = {"error": "invalid_input",
                            "detail": [_problem(e) for e in errors[:MAX_PROBLEMS]]}
    if len(errors) > MAX_PROBLEMS:
        body["more_problems"] = len(errors) - MAX_PROBLEMS
    return JSONResponse(body, status_code=422)


def install(app: FastAPI) -> None:
    """Every error answers `{"error": <code>, "detail": <message or list of problems>}`; a
    422 lists at most MAX_PROBLEMS problems (`more_problems`: how many more) and echoes
    each offending input cut to MAX_ECHO characters."""
    app.add_exception_handler(MagasinError, _magasin_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
