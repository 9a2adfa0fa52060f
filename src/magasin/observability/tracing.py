"""Distributed tracing (OpenTelemetry): one trace per transaction, across services.

Spans: the HTTP request (`server_span`), each publish to the bus (`publishing`), each
handler (`handling`, a child of the span whose traceparent the event carries) and each bank
call (`TracedBank`). Context travels as W3C `traceparent` in the stored events and in the
RabbitMQ headers, so it survives retries and restarts.

Configured only by the standard variables: tracing is on when `OTEL_TRACES_EXPORTER`
(`otlp` or `console`) or `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` is set, and
`OTEL_SDK_DISABLED` is not true. OTLP goes over HTTP/protobuf (`OTEL_EXPORTER_OTLP_*`,
`OTEL_BSP_*` are read by the SDK). Off, every helper here returns a shared no-op at once:
no span, no attribute is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from magasin.shared.commands import mode_of

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from starlette.types import Scope

    from magasin.shared.messages import RecordedEvent

SAGA_MODE = "magasin.saga.mode"
"""Span attribute: the coordination of the saga a message belongs to."""

log = logging.getLogger("magasin.observability.tracing")

_tracer: Tracer | None = None
"""The tracer while tracing is on; None when it is off (the default)."""
_provider: TracerProvider | None = None
_NOTHING: AbstractContextManager[None] = nullcontext()


def enabled() -> bool:
    return _tracer is not None


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service: str, env: Mapping[str, str] = os.environ) -> bool:
    """Start tracing as the OTEL_* variables say (service.name defaults to `service`);
    returns whether tracing is on."""
    if not wanted(env):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    attributes = {"service.name": env.get("OTEL_SERVICE_NAME") or service}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info("tracing on: %s spans of %s", type(exporter).__name__, attributes["service.name"])
    return True


def install(provider: TracerProvider | None) -> None:
    """Trace through `provider` (None: tracing off). Tests install an in-memory one."""
    global _tracer, _provider
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer("magasin")


def shutdown() -> None:
    """Flush the spans still buffered and stop tracing."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


# -- W3C trace context ------------------------------------------------------------------


def traceparent_of(span: Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The traceparent of the current span, to stamp on events being created (None when
    tracing is off or no span is current)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    span = trace.get_current_span()
    return traceparent_of(span) if span.get_span_context().is_valid else None


def _parent(traceparent: str | None) -> Any:
    """The OpenTelemetry context whose span is the one `traceparent` names."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


# -- spans at the choke points -----------------------------------------------------------


def handling(event: RecordedEvent, consumer: str) -> AbstractContextManager[str | None]:
    """Span of one handler run, child of the span that published `event`; yields its
    traceparent (for the events the handler emits), or None when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _handling(_tracer, event, consumer)


@contextmanager
def _handling(tracer: Tracer, event: RecordedEvent, consumer: str) -> Iterator[str | None]:
    from opentelemetry.trace import SpanKind

    attributes = {
        "messaging.operation.type": "process", "messaging.consumer.group.name": consumer,
        "messaging.message.id": event.event_id, "magasin.event.type": event.type,
        "magasin.correlation_id": event.correlation_id or "",
    }
    if (mode := mode_of(event)) is not None:
        attributes[SAGA_MODE] = mode
    with tracer.start_as_current_span(
        f"handle {event.type}", context=_parent(event.traceparent), kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield traceparent_of(span)


def publishing(
    events: Sequence[RecordedEvent], system: str
) -> AbstractContextManager[Sequence[RecordedEvent]]:
    """Spans of publishing `events` (one each, child of the span that emitted it); yields
    the events to send, each carrying its publish span as traceparent, so that the
    consumer's handler span is a child of the publish span."""
    if _tracer is None or not events:
        return nullcontext(events)
    return _publishing(_tracer, events, system)


@contextmanager
def _publishing(
    tracer: Tracer, events: Sequence[RecordedEvent], system: str
) -> Iterator[Sequence[RecordedEvent]]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    spans = [
        tracer.start_span(
            f"publish {e.type}", context=_parent(e.traceparent), kind=SpanKind.PRODUCER,
            attributes={"messaging.system": system, "messaging.operation.type": "send",
                        "messaging.message.id": e.event_id,
                        "messaging.destination.name": e.routing_key,
                        **({SAGA_MODE: mode} if (mode := mode_of(e)) else {})},
        )
        for e in events
    ]
    try:
        yield [replace(e, traceparent=traceparent_of(s)) for e, s in zip(events, spans,
                                                                        strict=True)]
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
        raise
    finally:
        for span in spans:
            span.end()


def span(name: str, attributes: Mapping[str, str | int]) -> AbstractContextManager[Any]:
    """A client span around an outside call (the bank, say); no-op when tracing is off."""
    if _tracer is None:
        return _NOTHING
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes)


def server_span(scope: Scope, request_id: str) -> AbstractContextManager[Any]:
    """The server span of an HTTP request, continuing the caller's `traceparent` header when
    it sends one and carrying its request id (`http.request.header.x-request-id`);
    `magasin.observability.http.RequestObservability` opens it. A no-op yielding None when
    tracing is off."""
    if _tracer is None:
        return _NOTHING
    from opentelemetry.trace import SpanKind

    header = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                   if k == b"traceparent"), None)
    method, path = scope["method"], scope["path"]
    return _tracer.start_as_current_span(
        f"{method} {path}", context=_parent(header), kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path,
                    "http.request.header.x-request-id": (request_id,)},
    )


def end_server_span(current: Span | None, method: str, route: str | None, status: int) -> None:
    """Name the request's span after the route that served it and record the answer."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if route:
        current.update_name(f"{method} {route}")
        current.set_attribute("http.route", route)
    current.set_attribute("http.response.status_code", status)
    if status >= 500:
        current.set_status(Status(StatusCode.ERROR))
