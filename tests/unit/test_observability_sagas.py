"""Saga metrics: counted at start, timed at the end, in flight by the furthest step reached."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore
from magasin.observability import metrics, sagas
from magasin.shared.messages import NewEvent, RecordedEvent

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with SqliteEventStore(tmp_path / "sagas.db") as opened:
        yield opened


def sample(name: str, **labels: str) -> float:
    if not name.startswith(("magasin_sagas_active", "magasin_sagas_stuck")):
        labels = {"mode": "choreography", **labels}  # counted and timed by coordination
    labels = {"saga": "transaction", **labels}
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def record(store: EventStore, saga: str, event_type: str, after_s: float) -> RecordedEvent:
    """Append a saga event `after_s` seconds after T0 (the consumer reads only its id)."""
    event = NewEvent(type=event_type, payload={"transaction_id": saga},
                     occurred_at=T0 + timedelta(seconds=after_s))
    return (await store.append(f"transaction-{saga}", [event]))[0]


async def consume(store: EventStore, event: RecordedEvent) -> None:
    async with store.transaction() as uow:
        await sagas.handlers()[event.type](event, uow)


async def test_a_saga_counts_when_it_starts_and_is_timed_when_it_completes(
    store: EventStore,
) -> None:
    started, completed = sample("magasin_sagas_started_total"), sample(
        "magasin_sagas_finished_total", outcome="completed")
    timed = sample("magasin_saga_duration_seconds_sum", outcome="completed")

    await consume(store, await record(store, "s1", "TransactionCreated", 0))
    assert sample("magasin_sagas_started_total") == started + 1
    assert await sagas.active_by_step(store) == {"PENDING": 1}

    await consume(store, await record(store, "s1", "PaymentRecorded", 1.5))
    assert await sagas.active_by_step(store) == {"PAYMENT_PROCESSED": 1}

    await consume(store, await record(store, "s1", "TransactionCompleted", 4.25))
    assert sample("magasin_sagas_finished_total", outcome="completed") == completed + 1
    assert sample("magasin_saga_duration_seconds_sum", outcome="completed") == timed + 4.25
    assert await sagas.active_by_step(store) == {}


async def test_a_cancelled_saga_counts_as_compensated(store: EventStore) -> None:
    compensated = sample("magasin_sagas_finished_total", outcome="compensated")
    await consume(store, await record(store, "s2", "TransactionCreated", 0))
    await consume(store, await record(store, "s2", "CompensationStarted", 1))
    assert await sagas.active_by_step(store) == {"CANCELLING": 1}
    await consume(store, await record(store, "s2", "TransactionCancelled", 2))
    assert sample("magasin_sagas_finished_total", outcome="compensated") == compensated + 1


async def test_a_step_delivered_late_never_moves_a_saga_back(store: EventStore) -> None:
    created = await record(store, "s3", "TransactionCreated", 0)
    paid = await record(store, "s3", "PaymentRecorded", 1)
    reserved = await record(store, "s3", "ReservationRecorded", 2)
    for event in (reserved, created, paid):
        await consume(store, event)
    assert await sagas.active_by_step(store) == {"INVENTORY_RESERVED": 1}


async def test_a_saga_begun_before_the_metrics_consumer_is_timed_from_its_stream(
    store: EventStore,
) -> None:
    timed = sample("magasin_saga_duration_seconds_sum", outcome="completed")
    await record(store, "s4", "TransactionCreated", 0)  # never consumed
    await consume(store, await record(store, "s4", "TransactionCompleted", 7))
    assert sample("magasin_saga_duration_seconds_sum", outcome="completed") == timed + 7


async def test_nothing_is_counted_when_the_unit_of_work_does_not_commit(
    store: EventStore,
) -> None:
    started = sample("magasin_sagas_started_total")
    created = await record(store, "s5", "TransactionCreated", 0)
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            await sagas.handlers()["TransactionCreated"](created, uow)
            raise RuntimeError("the handler's commit fails")
    assert sample("magasin_sagas_started_total") == started
    assert await sagas.active_by_step(store) == {}


def test_the_active_gauge_reports_every_step_even_when_none_is_in_flight() -> None:
    sagas.sample_active(Counter({"FULFILLED": 2}))
    assert sample("magasin_sagas_active", step="FULFILLED") == 2
    assert sample("magasin_sagas_active", step="PENDING") == 0
