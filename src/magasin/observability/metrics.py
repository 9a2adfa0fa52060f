"""Every Prometheus metric magasin exports, in one registry; docs/metrics.md lists them."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

# One registry of our own (not prometheus_client's global one) so that the exported set is
# exactly what this module declares: the Grafana test compares dashboard queries with it.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# Latencies in this system run from sub-millisecond (in-process append) to seconds (a saga
# waiting on a bank): buckets cover 1 ms .. 10 s; saga durations go up to 15 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SAGA_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

# --- publishing -----------------------------------------------------------------------------
EVENTS_PUBLISHED = Counter(
    "magasin_events_published_total",
    "Events handed to the bus (outbox relay or direct publish), by outcome ok|failed.",
    ["event_type", "service", "outcome"],
    registry=REGISTRY,
)
PUBLISH_DURATION = Histogram(
    "magasin_event_publish_duration_seconds",
    "Time to publish one batch of events to the bus.",
    ["service"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
OUTBOX_BACKLOG = Gauge(
    "magasin_outbox_backlog",
    "Events committed to the store and not yet published (stage publish), or published "
    "and not yet shipped to the consumers of the whole log (stage ship) (sampled).",
    ["service", "stage"],
    registry=REGISTRY,
)

# --- consumption ----------------------------------------------------------------------------
EVENTS_CONSUMED = Counter(
    "magasin_events_consumed_total",
    "Deliveries seen by a consumer, by outcome handled|duplicate|malformed|failed.",
    ["event_type", "consumer", "service", "outcome"],
    registry=REGISTRY,
)
BROKER_DELIVERIES = Counter(
    "magasin_broker_deliveries_total",
    "Messages the broker delivered to a consumer of this process, by kind: event (one "
    "event), log (a shipped batch of events, for a consumer of the whole log), dead_letter.",
    ["consumer", "service", "kind"],
    registry=REGISTRY,
)
HANDLING_DURATION = Histogram(
    "magasin_event_handling_duration_seconds",
    "Time a consumer spent handling one delivery (successful or not).",
    ["consumer", "service"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
INBOX_DUPLICATES = Counter(
    "magasin_inbox_duplicates_skipped_total",
    "Redelivered events skipped because the consumer's inbox already had them.",
    ["consumer", "service"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "magasin_event_retries_total",
    "Deliveries that failed and were scheduled for another attempt.",
    ["consumer", "service"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "magasin_dead_letters_total",
    "Deliveries moved to the dead-letter store, by reason kind.",
    ["consumer", "reason_kind"],
    registry=REGISTRY,
)
PARTITION_DEPTH = Gauge(
    "magasin_partition_depth",
    "Events waiting in one partition of a consumer: ready messages of its RabbitMQ queue, "
    "or log events past its lane's checkpoint in embedded mode (sampled).",
    ["consumer", "partition"],
    registry=REGISTRY,
)
PARTITION_OWNED = Gauge(
    "magasin_partition_owned",
    "1 for the process (owner) consuming a partition of a consumer now (sampled).",
    ["consumer", "partition", "owner"],
    registry=REGISTRY,
)
DEAD_LETTER_BACKLOG = Gauge(
    "magasin_dead_letters_pending",
    "Dead letters stored and not yet requeued or archived, by consumer (sampled).",
    ["consumer"],
    registry=REGISTRY,
)
PROJECTION_LAG = Gauge(
    "magasin_projection_lag_events",
    "Events in the store not yet applied by a projection (sampled).",
    ["projection"],
    registry=REGISTRY,
)
PROJECTION_LAG_SECONDS = Gauge(
    "magasin_projection_lag_seconds",
    "Age of the oldest event a projection has not applied yet, 0 when caught up (sampled).",
    ["projection"],
    registry=REGISTRY,
)

# --- sagas ----------------------------------------------------------------------------------
SAGAS_STARTED = Counter(
    "magasin_sagas_started_total",
    "Sagas started (a TransactionCreated seen), by coordination (mode).",
    ["saga", "mode"],
    registry=REGISTRY,
)
SAGAS_FINISHED = Counter(
    "magasin_sagas_finished_total",
    "Sagas finished, by outcome completed|compensated and coordination (mode).",
    ["saga", "outcome", "mode"],
    registry=REGISTRY,
)
SAGA_DURATION = Histogram(
    "magasin_saga_duration_seconds",
    "Time from a saga's start event to its final event, by outcome and coordination.",
    ["saga", "outcome", "mode"],
    buckets=SAGA_BUCKETS,
    registry=REGISTRY,
)
SAGAS_ACTIVE = Gauge(
    "magasin_sagas_active",
    "Sagas started and not finished, by the last step they reached.",
    ["saga", "step"],
    registry=REGISTRY,
)
SAGAS_STUCK = Gauge(
    "magasin_sagas_stuck",
    "Sagas whose compensation was retried and is still not confirmed, by status.",
    ["saga", "state"],
    registry=REGISTRY,
)

# --- resilience -----------------------------------------------------------------------------
BANK_RECONCILED = Counter(
    "magasin_bank_reconciled_total",
    "Charges the bank held for payments recorded as failed, settled by reconciliation: "
    "refunded now, or recorded as refunded already.",
    ["action"],
    registry=REGISTRY,
)
CIRCUIT_BREAKER_STATE = Gauge(
    "magasin_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
    ["name"],
    registry=REGISTRY,
)

# --- HTTP -----------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "magasin_http_requests_total",
    "HTTP requests served, by method, route template and status code.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "magasin_http_request_duration_seconds",
    "HTTP request latency, by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


# --- audit ------------------------------------------------------------------------------------
AUDIT_ALERTS = Counter(
    "magasin_audit_alerts",
    "Compliance alerts raised by the audit service, by kind payment_failed|"
    "inventory_unavailable.",
    ["kind"],
    registry=REGISTRY,
)

# --- process --------------------------------------------------------------------------------
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GC_PAUSE = Histogram(
    "magasin_gc_pause_seconds",
    "Collections of Python's cyclic garbage collector, by the oldest generation collected "
    "(0, 1, 2): every task of the process waits while one runs.",
    ["generation"],
    buckets=GC_PAUSE_BUCKETS,
    registry=REGISTRY,
)

LOOP_LAG = Histogram(
    "magasin_event_loop_lag_seconds",
    "How late the event loop of the serving process ran a timer due every 0.1 s: how long "
    "any ready task waited for the loop then (busy with other tasks, or blocked).",
    buckets=GC_PAUSE_BUCKETS,
    registry=REGISTRY,
)
LOOP_LAG_EVERY_S = 0.1

# --- helpers for the choke points -------------------------------------------------------------

BREAKER_STATES: Mapping[str, int] = {"closed": 0, "open": 1, "half_open": 2}
"""The value of magasin_circuit_breaker_state for each state name."""


def service_of(consumer: str) -> str:
    """Consumers are named `<service>` or `<service>.<role>` (e.g. `transaction.catalog`)."""
    return consumer.split(".", 1)[0]


def publisher_of(metadata: Mapping[str, Any]) -> str:
    """The service that wrote an event: stamped by commands (`service`) or by the consumer
    whose handler caused it (`consumer`)."""
    service = metadata.get("service")
    if isinstance(service, str) and service:
        return service
    consumer = metadata.get("consumer")
    if isinstance(consumer, str) and consumer:
        return service_of(consumer)
    return "unknown"


def _exemplar() -> dict[str, str] | None:
    """The current trace id, so a latency bucket in Grafana links to one trace; None when
    no trace is being recorded (tracing off costs a context lookup, no more)."""
    if _current_span is None:
        return None
    context = _current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x")}


try:  # the API package is tiny and always importable when tracing is installed
    from opentelemetry.trace import get_current_span as _current_span
except ImportError:  # pragma: no cover - tracing not installed
    _current_span = None  # type: ignore[assignment]


STORE_COMMITS = Counter(
    "magasin_store_commits_total",
    "Units of work committed to this process's event store (one database transaction each).",
    registry=REGISTRY,
)


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, kept: prometheus_client checks and locks on every call
    (1.9 us for four labels, 0.1 us from here), and the choke points below run per event.
    Their labels are bounded (types, consumers, route templates), and so is this map."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def published(
    events: Iterable[tuple[str, Mapping[str, Any]]], outcome: str, seconds: float | None = None
) -> None:
    """Count events (type, metadata) handed to the bus; `seconds` is the batch's latency."""
    services: set[str] = set()
    for event_type, metadata in events:
        who = publisher_of(metadata)
        services.add(who)
        _child(EVENTS_PUBLISHED, event_type, who, outcome).inc()
    if seconds is not None:
        for who in services:
            _child(PUBLISH_DURATION, who).observe(seconds)


def consumed(consumer: str, event_type: str, outcome: str, seconds: float) -> None:
    """Count one delivery to `consumer` and how long it took."""
    service = service_of(consumer)
    _child(EVENTS_CONSUMED, event_type, consumer, service, outcome).inc()
    _child(HANDLING_DURATION, consumer, service).observe(seconds, _exemplar())
    if outcome == "duplicate":
        INBOX_DUPLICATES.labels(consumer, service).inc()


def delivered(consumer: str, kind: str) -> None:
    """Count one message the broker delivered to `consumer`."""
    _child(BROKER_DELIVERIES, consumer, service_of(consumer), kind).inc()


def retried(consumer: str) -> None:
    RETRIES.labels(consumer, service_of(consumer)).inc()


def dead_lettered(consumer: str, reason_kind: str) -> None:
    DEAD_LETTERS.labels(consumer, reason_kind).inc()


def watch_breaker(name: str, state: Callable[[], str]) -> None:
    """Read a circuit breaker's state at each scrape (it turns half-open by the clock, with
    no call to tell us)."""
    CIRCUIT_BREAKER_STATE.labels(name).set_function(lambda: BREAKER_STATES.get(state(), -1))


_collection_started: list[float] = [0.0]


def _time_collection(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _collection_started[0] = time.perf_counter()
    else:
        _child(GC_PAUSE, str(info["generation"])).observe(
            time.perf_counter() - _collection_started[0])


def time_collections() -> None:
    """Time every collection of the cyclic garbage collector from now on (once per
    process; the runtime's serving processes call it)."""
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)


async def watch_loop_lag(every: float = LOOP_LAG_EVERY_S) -> None:
    """Until cancelled: sleep `every`, and observe in magasin_event_loop_lag_seconds how
    much later than due the loop woke this task. A wake costs the loop ~3 us (measured with
    uvloop), ten a second nothing to speak of. A saturated loop (the process running near a
    core's worth of work) or one blocked by a long synchronous call shows as lags of
    milliseconds and more."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        LOOP_LAG.observe(max(loop.time() - due, 0.0))


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    _child(HTTP_REQUESTS, method, route, str(status)).inc()
    _child(HTTP_DURATION, method, route).observe(seconds, _exemplar())


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The registry rendered for a scraper: OpenMetrics (with trace exemplars) when it asks
    for it, as Prometheus does, else the classic text format."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


def names() -> set[str]:
    """Every sample name this registry can export (histograms with _bucket/_sum/_count,
    counters with _total and _created)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    found: set[str] = set()
    for family in REGISTRY.collect():
        found |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return found
