"""The store service prepares the order of each sale whose stock inventory reserved."""

from __future__ import annotations

import asyncio

from magasin.messaging.dispatch import Outcome
from magasin.shared.commands import PrepareOrder
from magasin.shared.events import (
    SCHEMAS,
    InventoryReserved,
    OrderFulfilled,
    OrderFulfillmentFailed,
    SaleLine,
    StockLine,
)
from magasin.shared.messages import NewEvent
from magasin.stores import commands, readmodel
from magasin.stores.handlers import handlers
from tests.unit.conftest import Harness

LINES = (StockLine("p1", 2), StockLine("p2", 1))


def reserved(transaction_id: str, store_id: str) -> InventoryReserved:
    return InventoryReserved(
        transaction_id=transaction_id, reservation_id=f"r-{transaction_id}", store_id=store_id,
        lines=LINES, expires_at="2030-01-01T00:00:00+00:00",
    )


async def reserve(harness: Harness, transaction_id: str, store_id: str) -> Outcome:
    [event] = await harness.given(
        "reservation", f"r-{transaction_id}", reserved(transaction_id, store_id),
        correlation_id=transaction_id,
    )
    return (await harness.deliver("store", handlers(), event)).outcome


async def test_an_open_store_fulfils_the_order(harness: Harness) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    assert await reserve(harness, "t1", shop["store_id"]) is Outcome.HANDLED

    [fulfilled] = await harness.emitted(OrderFulfilled)
    assert fulfilled.transaction_id == "t1"
    assert fulfilled.store_id == shop["store_id"]
    assert fulfilled.order_id
    assert await harness.emitted(OrderFulfillmentFailed) == []
    doc = await harness.read_model(readmodel.ORDERS, "t1")
    assert doc is not None
    assert doc["status"] == "FULFILLED"
    assert doc["order_id"] == fulfilled.order_id
    assert doc["reason"] is None
    assert doc["lines"] == [{"product_id": "p1", "quantity": 2},
                            {"product_id": "p2", "quantity": 1}]


async def test_the_order_event_continues_the_sales_correlation(harness: Harness) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    await reserve(harness, "t1", shop["store_id"])
    [event] = await harness.store.read_stream("order-t1")
    assert event.type == "OrderFulfilled"
    assert event.correlation_id == "t1"


async def test_a_closed_store_fails_the_order(harness: Harness) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    await commands.close_store(harness.store, shop["store_id"], "renovation")
    assert await reserve(harness, "t1", shop["store_id"]) is Outcome.HANDLED

    assert await harness.emitted(OrderFulfilled) == []
    [failed] = await harness.emitted(OrderFulfillmentFailed)
    assert (failed.transaction_id, failed.reason) == ("t1", "store_closed")
    doc = await harness.read_model(readmodel.ORDERS, "t1")
    assert doc is not None
    assert (doc["status"], doc["reason"], doc["order_id"]) == ("FAILED", "store_closed", None)


async def test_a_reopened_store_fulfils_again(harness: Harness) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    await commands.close_store(harness.store, shop["store_id"], "renovation")
    await commands.reopen_store(harness.store, shop["store_id"])
    await reserve(harness, "t1", shop["store_id"])
    assert len(await harness.emitted(OrderFulfilled)) == 1


async def test_an_unknown_store_fails_the_order(harness: Harness) -> None:
    assert await reserve(harness, "t1", "nowhere") is Outcome.HANDLED
    [failed] = await harness.emitted(OrderFulfillmentFailed)
    assert (failed.transaction_id, failed.store_id, failed.reason) == (
        "t1", "nowhere", "unknown_store"
    )


async def test_a_redelivered_reservation_prepares_the_order_once(harness: Harness) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    [event] = await harness.given("reservation", "r1", reserved("t1", shop["store_id"]))
    assert (await harness.deliver("store", handlers(), event)).outcome is Outcome.HANDLED
    assert (await harness.deliver("store", handlers(), event)).outcome is Outcome.DUPLICATE
    assert len(await harness.emitted(OrderFulfilled)) == 1


async def test_a_second_reservation_message_for_a_sale_changes_nothing(
    harness: Harness,
) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    await reserve(harness, "t1", shop["store_id"])
    before = await harness.read_model(readmodel.ORDERS, "t1")
    # Same sale, another event id (a republished message): already reflected, a no-op.
    await commands.close_store(harness.store, shop["store_id"], "renovation")
    [again] = await harness.given("reservation", "r-t1-bis", reserved("t1", shop["store_id"]))
    assert (await harness.deliver("store", handlers(), again)).outcome is Outcome.HANDLED

    assert len(await harness.emitted(OrderFulfilled, OrderFulfillmentFailed)) == 1
    assert await harness.read_model(readmodel.ORDERS, "t1") == before


async def test_two_reservation_messages_at_once_prepare_one_order(harness: Harness) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    [first] = await harness.given("reservation", "r1", reserved("t1", shop["store_id"]))
    [second] = await harness.given("reservation", "r2", reserved("t1", shop["store_id"]))
    results = await asyncio.gather(
        harness.deliver("store", handlers(), first),
        harness.deliver("store", handlers(), second),
    )
    assert {r.outcome for r in results} == {Outcome.HANDLED}
    assert len(await harness.emitted(OrderFulfilled, OrderFulfillmentFailed)) == 1


def test_the_store_consumer_handles_inventory_reserved_and_prepare_order() -> None:
    assert set(handlers()) == {"InventoryReserved", "PrepareOrder"}


# -- orchestrated sales: the same preparation, on the orchestrator's command ---------------


async def test_prepare_order_command_fulfils_and_an_orchestrated_reservation_does_not(
    harness: Harness,
) -> None:
    shop = await commands.register_store(harness.store, "Plateau", "Montréal", "1 rue A")
    [by_itself] = await harness.store.append("reservation-r-t2", [NewEvent(
        "InventoryReserved", SCHEMAS.dump(reserved("t2", shop["store_id"])),
        correlation_id="t2", metadata={"baggage": {"saga_mode": "orchestration"}})])
    await harness.deliver("store", handlers(), by_itself)
    assert await harness.emitted(OrderFulfilled) == []

    command = PrepareOrder("t2:3", "transaction", "t2", shop["store_id"], "r-t2",
                           (SaleLine("p1", 2, 100), SaleLine("p2", 1, 100)))
    [sent] = await harness.given("saga_command", "t2", command, correlation_id="t2")
    await harness.deliver("store", handlers(), sent)
    [fulfilled] = await harness.emitted(OrderFulfilled)
    assert fulfilled.transaction_id == "t2"
    doc = await harness.read_model(readmodel.ORDERS, "t2")
    assert doc is not None and doc["lines"] == [{"product_id": "p1", "quantity": 2},
                                                {"product_id": "p2", "quantity": 1}]
