"""Saga metrics: counted at start, timed at the end, in flight by step, from plain facts;
and as the transaction service hands them over, in the unit of work that saves the sale."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore
from magasin.observability import metrics, sagas
from magasin.shared.events import SaleLine
from magasin.transactions import saga_index
from magasin.transactions.domain import Transaction

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with SqliteEventStore(tmp_path / "sagas.db") as opened:
        yield opened


def sample(name: str, mode: str = "choreography", **labels: str) -> float:
    if not name.startswith(("magasin_sagas_active", "magasin_sagas_stuck")):
        labels = {"mode": mode, **labels}  # counted and timed by coordination
    labels = {"saga": "transaction", **labels}
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_saga_counts_when_it_starts_and_is_timed_when_it_completes(
    store: EventStore,
) -> None:
    started, completed = sample("magasin_sagas_started_total"), sample(
        "magasin_sagas_finished_total", outcome="completed")
    timed = sample("magasin_saga_duration_seconds_sum", outcome="completed")

    async with store.transaction() as uow:
        sagas.started(uow, "s1", "choreography")
    assert sample("magasin_sagas_started_total") == started + 1
    assert await sagas.active_by_step(store) == {"PENDING": 1}

    async with store.transaction() as uow:
        sagas.moved(uow, "s1", "PAYMENT_PROCESSED")
    assert await sagas.active_by_step(store) == {"PAYMENT_PROCESSED": 1}

    async with store.transaction() as uow:
        sagas.ended(uow, "s1", completed=True, mode="choreography", started_at=T0,
                    ended_at=T0 + timedelta(seconds=4.25), store_id="st-1")
    assert sample("magasin_sagas_finished_total", outcome="completed") == completed + 1
    assert sample("magasin_saga_duration_seconds_sum", outcome="completed") == timed + 4.25
    assert await sagas.active_by_step(store) == {}
    ((key, record),) = await store.find_documents(sagas.ENDS)
    assert key == sagas.end_key(T0 + timedelta(seconds=4.25), "s1")
    assert (record["status"], record["store_id"], record["duration_s"]) == (
        "COMPLETED", "st-1", 4.25)


async def test_a_cancelled_saga_counts_as_compensated_in_its_mode(store: EventStore) -> None:
    compensated = sample("magasin_sagas_finished_total", "orchestration", outcome="compensated")
    async with store.transaction() as uow:
        sagas.started(uow, "s2", "orchestration")
        sagas.moved(uow, "s2", "CANCELLING")
    assert await sagas.active_by_step(store) == {"CANCELLING": 1}
    async with store.transaction() as uow:
        sagas.ended(uow, "s2", completed=False, mode="orchestration", started_at=T0,
                    ended_at=T0 + timedelta(seconds=2), reason="declined")
    assert sample("magasin_sagas_finished_total", "orchestration",
                  outcome="compensated") == compensated + 1
    ((_, record),) = await store.find_documents(sagas.ENDS)
    assert (record["status"], record["reason"]) == ("CANCELLED", "declined")


async def test_nothing_is_counted_when_the_unit_of_work_does_not_commit(
    store: EventStore,
) -> None:
    started = sample("magasin_sagas_started_total")
    with pytest.raises(RuntimeError):
        async with store.transaction() as uow:
            sagas.started(uow, "s5", "choreography")
            raise RuntimeError("the handler's commit fails")
    assert sample("magasin_sagas_started_total") == started
    assert await sagas.active_by_step(store) == {}


def test_the_active_gauge_reports_every_step_even_when_none_is_in_flight() -> None:
    sagas.sample_active(Counter({"FULFILLED": 2}))
    assert sample("magasin_sagas_active", step="FULFILLED") == 2
    assert sample("magasin_sagas_active", step="PENDING") == 0


# -- as the transaction service saves its sales --------------------------------------------


async def save(store: EventStore, ident: str, change: Callable[[Transaction], object]) -> None:
    async with store.transaction() as uow:
        sale = await saga_index.sales.get(uow, ident)
        change(sale)
        await saga_index.save(uow, sale)


async def test_a_sale_saved_through_its_steps_is_counted_once_at_each_end(
    store: EventStore,
) -> None:
    started = sample("magasin_sagas_started_total", "orchestration")
    completed = sample("magasin_sagas_finished_total", "orchestration", outcome="completed")
    sale = Transaction.create("tx-1", store_id="s-1", customer_id="c", currency="CAD",
                              payment_method="VISA", lines=[SaleLine("p-1", 1, 500)],
                              saga_mode="orchestration")
    async with store.transaction() as uow:
        await saga_index.save(uow, sale)
    assert sample("magasin_sagas_started_total", "orchestration") == started + 1
    assert await sagas.active_by_step(store) == {"PENDING": 1}
    await save(store, "tx-1", lambda s: s.payment_captured("pay-1", 500))
    await save(store, "tx-1", lambda s: s.payment_captured("pay-1", 500))  # redelivered
    assert await sagas.active_by_step(store) == {"PAYMENT_PROCESSED": 1}
    await save(store, "tx-1", lambda s: s.inventory_reserved("res-1"))
    await save(store, "tx-1", lambda s: s.order_fulfilled("ord-1"))
    await save(store, "tx-1", lambda s: s.order_fulfilled("ord-1"))  # redelivered
    assert sample("magasin_sagas_started_total", "orchestration") == started + 1
    assert sample("magasin_sagas_finished_total", "orchestration",
                  outcome="completed") == completed + 1
    assert await sagas.active_by_step(store) == {}
    events = await store.read_stream("transaction-tx-1")
    ((_, record),) = await store.find_documents(sagas.ENDS)
    assert record["duration_s"] == round(
        (events[-1].occurred_at - events[0].occurred_at).total_seconds(), 6)
    assert record["ended_at"] == events[-1].occurred_at.isoformat()
