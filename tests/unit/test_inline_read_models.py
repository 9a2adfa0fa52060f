"""The per-stream read models are inline: a sale's documents commit with its events, and
projecting those events again (the runner passing them) changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from magasin.projections import Projection, ProjectionUnit
from magasin.projections.catalog import all_projections
from magasin.projections.inline import install
from magasin.projections.projection import project
from magasin.shared.events import (
    SCHEMAS,
    ChargeReconciled,
    InventoryCommitted,
    InventoryReserved,
    OrderFulfilled,
    PaymentFailed,
    PaymentProcessed,
    PaymentRecorded,
    PaymentRefunded,
    ReservationRecorded,
    SaleLine,
    StockLine,
    TransactionCompleted,
    TransactionCreated,
)
from magasin.shared.ids import stream_id
from magasin.shared.messages import NewEvent
from tests.unit.conftest import Harness

LINES = (StockLine("p-1", 2),)
SALES: dict[str, tuple[str, str, list[list[Any]]]] = {
    # projection: (aggregate, collection, the units of work appending the stream's events)
    "transaction.transactions": ("transaction", "transaction.transactions", [
        [TransactionCreated("tx-1", "s-1", "alice", (SaleLine("p-1", 2, 500),), 1000, "CAD",
                            "VISA")],
        [PaymentRecorded("tx-1", "pay-1", 1000)],
        [ReservationRecorded("tx-1", "res-1"),
         TransactionCompleted("tx-1", "s-1", "alice", 1000, "CAD", "ord-1")],
    ]),
    "payment.payments": ("payment", "payment.payments", [
        [PaymentProcessed("pay-1", "tx-1", 1000, "CAD", "bank-1", "s-1", LINES)],
        [PaymentRefunded("pay-1", "tx-1", 1000, "CAD", "cancelled", "bank-2")],
    ]),
    "inventory.reservations": ("reservation", "inventory.reservations", [
        [InventoryReserved("tx-1", "res-1", "s-1", LINES, "2030-01-01T00:00:00+00:00")],
        [InventoryCommitted("tx-1", "res-1", "s-1", LINES, per_item_commits=False)],
    ]),
    "store.orders": ("order", "store.orders", [
        [OrderFulfilled("ord-1", "tx-1", "s-1", LINES)],
    ]),
}


def test_the_read_models_of_one_stream_each_are_inline_and_the_stock_is_not() -> None:
    inline = sorted(name for name, p in all_projections().items() if p.inline)
    assert inline == sorted(SALES)


async def append(harness: Harness, aggregate: str, units: list[list[Any]]) -> None:
    version = 0
    for payloads in units:
        events = [NewEvent(type(p).__name__, SCHEMAS.dump(p)) for p in payloads]
        await harness.store.append(stream_id(aggregate, "tx-1"), events, version)
        version += len(events)


@pytest.mark.parametrize("name", sorted(SALES))
async def test_a_sale_s_document_commits_with_its_events_and_a_replay_changes_nothing(
    harness: Harness, name: str,
) -> None:
    projection: Projection = all_projections()[name]
    aggregate, collection, units = SALES[name]
    install(harness.store, [projection])

    await append(harness, aggregate, units)
    inline = await harness.store.get_document(collection, "tx-1")
    again = ProjectionUnit(harness.store)  # as the runner projects them, found applied
    await project(projection, await harness.store.read_all(), again)

    assert inline is not None
    assert inline["version"] == sum(len(u) for u in units)
    assert again.changes == {}
    assert inline == await from_scratch(harness, projection, collection)


async def from_scratch(harness: Harness, projection: Projection, collection: str) -> Any:
    unit = ProjectionUnit(harness.store, {collection: "elsewhere"})
    await project(projection, await harness.store.read_all(), unit)
    return unit.changes["elsewhere", "tx-1"]


async def test_a_failed_payment_then_reconciled_is_one_document_inline(
    harness: Harness,
) -> None:
    install(harness.store, [all_projections()["payment.payments"]])
    await append(harness, "payment", [
        [PaymentFailed("pay-1", "tx-1", 1000, "CAD", "timeout", "s-1")],
        [ChargeReconciled("pay-1", "tx-1", "bank-9", 1000, "CAD", "refunded", "bank-10")],
    ])

    doc = await harness.store.get_document("payment.payments", "tx-1")
    assert doc is not None
    assert (doc["status"], doc["version"], doc["reconciled"]["action"]) == (
        "FAILED", 2, "refunded")
