"""The transactions read model, projected from the transaction streams' events alone."""

from __future__ import annotations

from magasin.projections import catch_up
from magasin.shared.events import (
    CompensationStarted,
    FulfilmentRecorded,
    PaymentRecorded,
    RefundRecorded,
    ReservationRecorded,
    SaleLine,
    TransactionCancelled,
    TransactionCompleted,
    TransactionCreated,
)
from magasin.transactions.projection import TRANSACTIONS, projection
from tests.unit.conftest import Harness

CREATED = TransactionCreated("tx-1", "s-1", "alice", (SaleLine("p-1", 2, 500),), 1000, "CAD",
                             "VISA")


async def history(harness: Harness) -> list[str]:
    await catch_up(harness.store, projection())
    doc = await harness.store.get_document(TRANSACTIONS, "tx-1")
    assert doc is not None
    return [h["status"] for h in doc["history"]]


async def test_facts_recorded_out_of_order_still_show_every_step(harness: Harness) -> None:
    await harness.given(
        "transaction", "tx-1", CREATED, ReservationRecorded("tx-1", "res-1"),
        PaymentRecorded("tx-1", "pay-1", 1000), FulfilmentRecorded("tx-1", "ord-1"),
        TransactionCompleted("tx-1", "s-1", "alice", 1000, "CAD"),
    )
    assert await history(harness) == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
    ]


async def test_a_completion_carrying_its_order_shows_the_fulfilment_too(
    harness: Harness,
) -> None:
    await harness.given(
        "transaction", "tx-1", CREATED, PaymentRecorded("tx-1", "pay-1", 1000),
        ReservationRecorded("tx-1", "res-1"),
        TransactionCompleted("tx-1", "s-1", "alice", 1000, "CAD", "ord-1"),
    )
    assert await history(harness) == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
    ]
    doc = await harness.store.get_document(TRANSACTIONS, "tx-1")
    assert doc is not None
    assert (doc["status"], doc["order_id"], doc["version"]) == ("COMPLETED", "ord-1", 4)


async def test_a_compensated_sale_shows_cancelling_then_cancelled_with_its_reason(
    harness: Harness,
) -> None:
    recorded = await harness.given(
        "transaction", "tx-1", CREATED, PaymentRecorded("tx-1", "pay-1", 1000),
        CompensationStarted("tx-1", "inventory_unavailable", True, False),
        RefundRecorded("tx-1", 1000),
        TransactionCancelled("tx-1", "s-1", "alice", "inventory_unavailable"),
    )
    assert await history(harness) == [
        "PENDING", "PAYMENT_PROCESSED", "CANCELLING", "CANCELLED",
    ]
    doc = await harness.store.get_document(TRANSACTIONS, "tx-1")
    assert doc is not None
    assert (doc["status"], doc["reason"], doc["payment_id"], doc["version"]) == (
        "CANCELLED", "inventory_unavailable", "pay-1", 5,
    )
    assert doc["created_at"] == recorded[0].occurred_at.isoformat()
    assert doc["updated_at"] == recorded[-1].occurred_at.isoformat()
