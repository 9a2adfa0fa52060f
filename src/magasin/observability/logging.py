"""Logs: one JSON object per line in distributed mode, a readable line in embedded mode;
both carry the service, trace id, correlation id and event id of what is being handled.

The dispatcher and the HTTP layer set the context (`delivering`, `bind`) in contextvars, so
any `logging` call below them is tagged without passing anything around. The format is
`MAGASIN_LOG_FORMAT=json|console` (default: console for `magasin up`, json for `serve`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from magasin.shared.ids import hex_id

if TYPE_CHECKING:
    from starlette.types import Scope

    from magasin.shared.messages import RecordedEvent

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "magasin_log_context", default=None
)
_service = "magasin"
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def _trace_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current span, if a trace is being recorded."""
    try:
        from opentelemetry.trace import get_current_span
    except ImportError:  # pragma: no cover - tracing not installed
        return None, None
    ctx = get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def context() -> dict[str, str]:
    """The fields every log line carries now (service, trace, correlation, event...)."""
    fields = {"service": _service, **(_context.get() or {})}
    trace_id, span_id = _trace_ids()
    if trace_id is not None:
        fields["trace_id"] = trace_id
        fields["span_id"] = span_id or ""
    elif (parent := fields.pop("traceparent", None)) and len(parent) >= 35:
        fields["trace_id"] = parent[3:35]  # tracing off here, but the event carries one
    fields.pop("traceparent", None)
    return fields


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Add fields to the log context of everything run in the block."""
    token = _context.set({**(_context.get() or {}),
                          **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class _Bound:
    """The log context of one delivery or one HTTP request; a plain class because it runs
    for every one of them (a generator-based context manager costs several times more)."""

    __slots__ = ("fields", "token")

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields

    def __enter__(self) -> None:
        self.token = _context.set(self.fields)

    def __exit__(self, *exc: object) -> None:
        _context.reset(self.token)


def delivering(event: RecordedEvent, consumer: str) -> AbstractContextManager[None]:
    """The log context of one delivery: its consumer, event and transaction."""
    fields = {"consumer": consumer, "event_id": event.event_id, "event_type": event.type}
    if event.correlation_id is not None:
        fields["correlation_id"] = event.correlation_id
    if event.traceparent is not None:
        fields["traceparent"] = event.traceparent
    return _Bound(fields)


REQUEST_ID_MAX = 200


def _request_id(value: bytes) -> str | None:
    """The caller's request id if it is a sane one (visible ASCII, bounded), else None."""
    if 0 < len(value) <= REQUEST_ID_MAX and all(0x21 <= c <= 0x7E for c in value):
        return value.decode("ascii")
    return None


def serving(scope: Scope) -> tuple[AbstractContextManager[None], str]:
    """The log context of serving one HTTP request, and its request id: lines logged while
    serving it carry its method, path, request id and the caller's `X-Correlation-ID` when
    it sends one (`magasin.observability.http.RequestObservability` opens it).

    The request id is the caller's `X-Request-Id` (the gateway sets one on every request it
    passes), or one made here; it goes back in the answer's `X-Request-Id` and onto the
    request's span (`http.request.header.x-request-id`), so a log line, a trace and the
    gateway's access log of one request can be found from each other."""
    fields = {"http_method": scope["method"], "http_path": scope["path"]}
    request_id = None
    for key, value in scope.get("headers", ()):
        if key == b"x-correlation-id":
            fields["correlation_id"] = value.decode("latin-1")[:200]
        elif key == b"x-request-id":
            request_id = _request_id(value)
    if request_id is None:
        request_id = hex_id()
    fields["request_id"] = request_id
    return _Bound(fields), request_id


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **context(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """`time LEVEL logger message  key=value...` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = context()
        fields.pop("service", None)
        fields.pop("span_id", None)
        if "trace_id" in fields:
            fields["trace_id"] = fields["trace_id"][:16]
        if not fields:
            return line
        tags = " ".join(f"{k}={v}" for k, v in fields.items())
        head, _, rest = line.partition("\n")
        return f"{head}  [{tags}]" + (f"\n{rest}" if rest else "")


def configure(service: str, default_format: str = "console", level: int = logging.INFO) -> str:
    """Send every log record to stderr in the chosen format; returns the format used."""
    global _service
    _service = service
    fmt = os.environ.get("MAGASIN_LOG_FORMAT", "").strip().lower() or default_format
    if fmt not in ("json", "console"):
        raise SystemExit(f"MAGASIN_LOG_FORMAT must be json or console, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return fmt
