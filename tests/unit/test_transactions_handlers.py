"""The transaction service's handlers, delivered as the bus would deliver them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from magasin.messaging.dispatch import Outcome
from magasin.projections import catch_up
from magasin.shared.events import (
    InventoryReserved,
    InventoryUnavailable,
    OrderFulfilled,
    PaymentProcessed,
    PaymentRefunded,
    ProductAdded,
    ProductPriceChanged,
    SaleLine,
    StockLine,
    StoreRegistered,
    TransactionCompleted,
)
from magasin.transactions import readmodel
from magasin.transactions.domain import Transaction
from magasin.transactions.handlers import (
    catalog_handlers,
    notifier_handlers,
    saga_handlers,
    sales,
    step_handlers,
)
from magasin.transactions.projection import projection
from tests.unit.conftest import Harness

SAGA = saga_handlers()


async def open_sale(
    harness: Harness, callback: str | None = None, saga_mode: str = "choreography"
) -> str:
    sale = Transaction.create("tx-1", store_id="s-1", customer_id="c", currency="CAD",
                              payment_method="VISA", lines=[SaleLine("p-1", 2, 500)],
                              callback_url=callback, saga_mode=saga_mode)
    async with harness.store.transaction() as uow:
        sales.save(uow, sale)
    return sale.id


def paid(tx: str) -> PaymentProcessed:
    return PaymentProcessed("pay-1", tx, 1000, "CAD", "CH-1", "s-1", (StockLine("p-1", 2),))


def fulfilled(tx: str) -> OrderFulfilled:
    """The store's report as a choreographed chain passes it on: the payment, then the
    reservation, then the order."""
    return OrderFulfilled("ord-1", tx, "s-1", payment_id="pay-1", reservation_id="res-1")


async def read_model(harness: Harness, tx: str) -> dict[str, Any]:
    """The sale's document once the projection has caught up with what the handlers wrote."""
    await catch_up(harness.store, projection())
    doc = await harness.store.get_document(readmodel.TRANSACTIONS, tx)
    assert doc is not None
    return doc


async def status(harness: Harness, tx: str) -> str:
    return str((await read_model(harness, tx))["status"])


async def test_the_order_completes_a_choreographed_sale_with_its_payment_and_reservation(
    harness: Harness,
) -> None:
    tx = await open_sale(harness)
    # The service hears one event of the happy path (seed 6.1.1): the others are not its.
    assert "PaymentProcessed" not in SAGA and "InventoryReserved" not in SAGA
    (event,) = await harness.given("order", tx, fulfilled(tx), correlation_id=tx)
    assert (await harness.deliver("transaction", SAGA, event)).outcome is Outcome.HANDLED

    (completed,) = await harness.emitted(TransactionCompleted)
    assert (completed.total, completed.payment_id, completed.reservation_id) == (
        1000, "pay-1", "res-1")
    doc = await read_model(harness, tx)
    assert (doc["status"], doc["payment_id"], doc["reservation_id"], doc["order_id"]) == (
        "COMPLETED", "pay-1", "res-1", "ord-1")
    # The history still shows every step of the happy path, all dated by the completion.
    assert [h["status"] for h in doc["history"]] == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
    ]
    assert len({h["at"] for h in doc["history"][1:]}) == 1


async def test_an_orchestrated_sale_records_each_step_as_it_happens(harness: Harness) -> None:
    tx = await open_sale(harness, saga_mode="orchestration")
    steps = step_handlers()
    for aggregate, payload, expected in (
        ("payment", paid(tx), "PAYMENT_PROCESSED"),
        ("reservation", InventoryReserved(tx, "res-1", "s-1", (StockLine("p-1", 2),), "2030"),
         "INVENTORY_RESERVED"),
    ):
        (event,) = await harness.given(aggregate, tx, payload, correlation_id=tx)
        assert (await harness.deliver("transaction.steps", steps, event)).outcome is (
            Outcome.HANDLED)
        assert await status(harness, tx) == expected
    (event,) = await harness.given("order", tx, OrderFulfilled("ord-1", tx, "s-1"))
    await harness.deliver("transaction", SAGA, event)
    doc = await read_model(harness, tx)
    assert (doc["status"], doc["payment_id"], doc["reservation_id"]) == (
        "COMPLETED", "pay-1", "res-1")
    assert [h["status"] for h in doc["history"]] == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
    ]


async def test_the_events_a_step_causes_carry_its_correlation_and_causation(
    harness: Harness,
) -> None:
    tx = await open_sale(harness)
    (event,) = await harness.given("order", tx, fulfilled(tx), correlation_id=tx)
    await harness.deliver("transaction", SAGA, event)
    recorded = await harness.store.read_stream(sales.stream(tx))
    assert recorded[-1].type == "TransactionCompleted"
    assert (recorded[-1].correlation_id, recorded[-1].causation_id) == (tx, event.event_id)


async def test_a_duplicate_report_has_no_second_effect(harness: Harness) -> None:
    tx = await open_sale(harness)
    (event,) = await harness.given("order", tx, fulfilled(tx), correlation_id=tx)
    await harness.deliver("transaction", SAGA, event)
    again = await harness.deliver("transaction", SAGA, event)
    assert again.outcome is Outcome.DUPLICATE
    assert len(await harness.store.read_stream(sales.stream(tx))) == 2


async def test_a_shortage_cancels_only_after_the_refund(harness: Harness) -> None:
    tx = await open_sale(harness)
    (event,) = await harness.given("reservation", tx, InventoryUnavailable(tx, "s-1", ()))
    await harness.deliver("transaction", SAGA, event)
    assert await status(harness, tx) == "CANCELLING"
    (refund,) = await harness.given(
        "payment", tx, PaymentRefunded("pay-1", tx, 1000, "CAD", "inventory_unavailable", "RF")
    )
    await harness.deliver("transaction", SAGA, refund)
    assert await status(harness, tx) == "CANCELLED"


async def test_a_report_about_an_unknown_sale_fails_so_the_bus_retries(
    harness: Harness,
) -> None:
    (event,) = await harness.given("order", "nobody", fulfilled("nobody"))
    result = await harness.deliver("transaction", SAGA, event)
    assert result.outcome is Outcome.FAILED
    assert "no transaction nobody" in result.reason


async def test_the_catalog_replica_keeps_the_newest_price(harness: Harness) -> None:
    catalog = catalog_handlers()
    added, changed = await harness.given(
        "product", "p-1", ProductAdded("p-1", "SKU", "Café", 1899, "CAD"),
        ProductPriceChanged("p-1", 1999, "CAD"),
    )
    await harness.deliver("transaction.catalog", catalog, added)
    await harness.deliver("transaction.catalog", catalog, changed)
    # The same product added again later (a replay from another consumer name) is older
    # news than the price change: the replica keeps the newer price.
    await harness.deliver("transaction.catalog.replay", catalog, added)
    doc = await harness.store.get_document(readmodel.PRODUCTS, "p-1")
    assert doc is not None and doc["unit_price"] == 1999
    (store,) = await harness.given("store", "s-1", StoreRegistered("s-1", "A", "B", "C"))
    await harness.deliver("transaction.catalog", catalog, store)
    assert await harness.store.get_document(readmodel.STORES, "s-1") is not None


async def test_a_price_change_before_the_product_is_known_is_retried(
    harness: Harness,
) -> None:
    (changed,) = await harness.given("product", "p-9", ProductPriceChanged("p-9", 5, "CAD"))
    result = await harness.deliver("transaction.catalog", catalog_handlers(), changed)
    assert result.outcome is Outcome.FAILED


@pytest.mark.parametrize("answer", [200, 500])
async def test_the_webhook_posts_the_final_state_and_a_failure_is_retried(
    harness: Harness, answer: int
) -> None:
    seen: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answer)

    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as client:
        tx = await open_sale(harness, callback="http://shop.example/hook")
        (done,) = await harness.given("transaction", "x", TransactionCompleted(
            tx, "s-1", "c", 1000, "CAD"))
        result = await harness.deliver("transaction.notifier", notifier_handlers(client), done)

    assert len(seen) == 1
    assert seen[0].headers["Idempotency-Key"] == done.event_id
    assert b'"status":"COMPLETED"' in seen[0].content
    expected = Outcome.HANDLED if answer == 200 else Outcome.FAILED
    assert result.outcome is expected
