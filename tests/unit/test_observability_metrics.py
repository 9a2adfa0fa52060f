"""The metrics module: breaker state read at scrape time, exposition formats, trace exemplars,
and the sampler's backlogs."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from magasin.bootstrap import Runtime
from magasin.config import Settings
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import Causation
from magasin.messaging import deadletters
from magasin.messaging.bus import DeadLetter
from magasin.messaging.inprocess import InProcessBus
from magasin.messaging.outbox import OutboxRelay
from magasin.observability import metrics
from magasin.observability.sampler import sample_once
from magasin.payments.breaker import BreakerPolicy, CircuitBreaker
from magasin.payments.gateway import BankSimulator
from magasin.shared.clock import utcnow
from magasin.shared.errors import Unavailable
from magasin.shared.events import SCHEMAS
from magasin.shared.messages import NewEvent, RecordedEvent


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_collector_s_pauses_are_timed_by_generation_once_asked() -> None:
    def collected(generation: str) -> float:
        return metrics.REGISTRY.get_sample_value(
            "magasin_gc_pause_seconds_count", {"generation": generation}) or 0.0

    before = collected("1")
    gc.collect(1)
    assert collected("1") == before  # not timed until a serving process asks
    metrics.time_collections()
    metrics.time_collections()  # asked twice: each collection still observed once
    try:
        gc.collect(1)
        assert collected("1") == before + 1
        assert metrics.REGISTRY.get_sample_value(
            "magasin_gc_pause_seconds_sum", {"generation": "1"}) > 0
    finally:
        gc.callbacks.remove(metrics._time_collection)


async def test_a_loop_blocked_by_a_synchronous_call_shows_as_loop_lag() -> None:
    def lags(over: str) -> float:
        """Samples later than `over` seconds (a bucket counts those at or below its bound)."""
        def sample(name: str, labels: dict[str, str]) -> float:
            return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

        return (sample("magasin_event_loop_lag_seconds_count", {})
                - sample("magasin_event_loop_lag_seconds_bucket", {"le": over}))

    watcher = asyncio.create_task(metrics.watch_loop_lag(every=0.01))
    try:
        await asyncio.sleep(0.05)  # a few samples of an idle loop: none that late
        before = lags("0.1")
        time.sleep(0.2)  # noqa: ASYNC251 - the blocking call under test
        await asyncio.sleep(0.05)
        assert lags("0.1") >= before + 1
    finally:
        watcher.cancel()


def breaker_state(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("magasin_circuit_breaker_state", {"name": name})


async def test_the_breaker_state_is_read_at_each_scrape_and_turns_half_open_by_the_clock(
) -> None:
    bank, clock = BankSimulator(latency_s=0), Clock()
    breaker = CircuitBreaker(bank, BreakerPolicy(min_calls=2, window=2, open_s=30), clock=clock)
    metrics.watch_breaker("test-bank", lambda: breaker.state.value)
    assert breaker_state("test-bank") == 0

    bank.reachable = False
    for n in range(2):
        with pytest.raises(Unavailable):
            await breaker.charge(f"k{n}", 100, "CAD", "VISA")
    assert breaker_state("test-bank") == 1
    clock.now += 31
    assert breaker_state("test-bank") == 2


def test_prometheus_gets_openmetrics_with_the_trace_of_a_slow_request_as_exemplar() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        metrics.http_request("GET", "/exemplar-test", 200, 0.042)
        trace_id = format(span.get_span_context().trace_id, "032x")

    body, content_type = metrics.exposition(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text")
    bucket = next(line for line in body.decode().splitlines()
                  if 'route="/exemplar-test"' in line and 'le="0.05"' in line)
    assert f'# {{trace_id="{trace_id}"}} 0.042' in bucket


def test_a_scraper_without_openmetrics_gets_the_text_format_without_exemplars() -> None:
    metrics.http_request("GET", "/plain-test", 200, 0.01)
    body, content_type = metrics.exposition(None)
    assert content_type.startswith("text/plain")
    assert "trace_id" not in body.decode()
    assert 'magasin_http_requests_total{method="GET",route="/plain-test",status="200"}' in (
        body.decode()
    )


def test_events_are_attributed_to_the_service_or_consumer_that_wrote_them() -> None:
    assert metrics.publisher_of({"service": "inventory", "actor": "expiry"}) == "inventory"
    assert metrics.publisher_of({"consumer": "transaction.catalog"}) == "transaction"
    assert metrics.publisher_of({}) == "unknown"


async def test_the_sampler_reports_pending_dead_letters_by_consumer(tmp_path: Path) -> None:
    runtime = Runtime.embedded(Settings(data_dir=tmp_path, bank_latency_ms=0))
    await runtime.store.open()
    try:
        async with runtime.store.transaction(Causation()) as uow:
            for n in range(2):
                deadletters.record(uow, DeadLetter(
                    id=f"payment:e{n}", consumer="payment", reason="NotFound: no sale",
                    attempts=3, routing_key="transaction.TransactionCreated",
                    dead_lettered_at=utcnow(), event=None, body="{}",
                ))
        await sample_once(runtime)
    finally:
        await runtime.store.close()
    pending = metrics.REGISTRY.get_sample_value
    assert pending("magasin_dead_letters_pending", {"consumer": "payment"}) == 2
    assert pending("magasin_dead_letters_pending", {"consumer": "inventory"}) == 0


def published(event_type: str, service: str, outcome: str) -> float:
    labels = {"event_type": event_type, "service": service, "outcome": outcome}
    return metrics.REGISTRY.get_sample_value("magasin_events_published_total", labels) or 0.0


class BrokerDown(InProcessBus):
    async def publish(self, events: Sequence[RecordedEvent]) -> None:
        raise Unavailable("broker down")


async def test_with_an_outbox_events_count_as_published_when_the_relay_publishes_them(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "outbox.db", outbox=True) as store:
        before = published("OutboxProbe", "inventory", "ok")
        written = NewEvent(type="OutboxProbe", payload={}, metadata={"service": "inventory"})
        await store.append("probe-1", [written])
        assert published("OutboxProbe", "inventory", "ok") == before, "stored, not published"

        assert await OutboxRelay(store, InProcessBus(store, SCHEMAS)).relay_once() == 1
        assert published("OutboxProbe", "inventory", "ok") == before + 1


async def test_a_relay_that_cannot_reach_the_broker_counts_failed_publishes(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "outbox.db", outbox=True) as store:
        before = published("OutboxProbe", "store", "failed")
        await store.append("probe-2", [
            NewEvent(type="OutboxProbe", payload={}, metadata={"consumer": "store"})
        ])
        with pytest.raises(Unavailable):
            await OutboxRelay(store, BrokerDown(store, SCHEMAS)).relay_once()
        assert published("OutboxProbe", "store", "failed") == before + 1
        assert await store.outbox_backlog() == 1


async def test_commits_count_as_publishes_only_where_the_log_is_the_bus(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "archive.db") as store:
        before = published("ArchiveProbe", "payment", "ok")
        probe = NewEvent(type="ArchiveProbe", payload={}, metadata={"service": "payment"})
        await store.append("probe-3", [probe])  # an archive copy (event store service)
        assert published("ArchiveProbe", "payment", "ok") == before

        InProcessBus(store, SCHEMAS)  # embedded mode: the log is the bus from now on
        await store.append("probe-4", [
            NewEvent(type="ArchiveProbe", payload={}, metadata={"service": "payment"})
        ])
        assert published("ArchiveProbe", "payment", "ok") == before + 1
