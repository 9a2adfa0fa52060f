"""The inventory consumer, driven exactly as the bus drives it, plus its own commands."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore_service import history
from magasin.inventory.commands import expire_reservations, expiry_loop, restock
from magasin.inventory.handlers import handlers
from magasin.messaging.dispatch import Outcome, Result
from magasin.shared.commands import ReleaseStock, ReserveStock
from magasin.shared.errors import InvalidInput, NotFound
from magasin.shared.events import (
    SCHEMAS,
    InventoryCommitted,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    MissingLine,
    OrderFulfillmentFailed,
    PaymentProcessed,
    ProductAdded,
    ReservationExpired,
    ReservationFulfilled,
    ReservationVoided,
    SagaAborted,
    SaleLine,
    StockAdded,
    StockCommitted,
    StockLine,
    StockReleased,
    StockReserved,
    StoreRegistered,
    TransactionCancelled,
    TransactionCompleted,
)
from magasin.shared.messages import NewEvent
from tests.unit.conftest import Harness, project_all

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
TTL = 600.0
INVENTORY = handlers(TTL, clock=lambda: NOW)


async def catalog(harness: Harness, store: str = "S1", products: tuple[str, ...] = ("P1", "P2")
                  ) -> None:
    """The store service registered a store and products: the inventory keeps replicas."""
    events = await harness.given("store", store, StoreRegistered(store, "Centre", "D1", "1 rue"))
    for product in products:
        events += await harness.given(
            "product", product, ProductAdded(product, f"SKU-{product}", product, 250, "CAD")
        )
    for event in events:
        assert (await harness.deliver("inventory", INVENTORY, event)).outcome is Outcome.HANDLED


async def stocked(harness: Harness, **quantities: int) -> None:
    await catalog(harness, products=tuple(quantities))
    for product, quantity in quantities.items():
        await restock(harness.store, "S1", product, quantity)


async def send(harness: Harness, transaction_id: str, *payloads: Any) -> list[Result]:
    """Another service publishes these events of a transaction; the inventory handles them."""
    results = []
    for payload in payloads:
        [event] = await harness.given(
            "other", f"{type(payload).__name__}-{transaction_id}", payload,
            correlation_id=transaction_id,
        )
        results.append(await harness.deliver("inventory", INVENTORY, event))
    await project_all(harness.store)  # the expiry sweep reads the reservations read model
    return results


def paid(transaction_id: str, *lines: tuple[str, int], store: str = "S1") -> PaymentProcessed:
    return PaymentProcessed(
        f"pay-{transaction_id}", transaction_id, 1000, "CAD", "BANK-1", store,
        tuple(StockLine(p, q) for p, q in lines),
    )


def cancelled(transaction_id: str) -> TransactionCancelled:
    return TransactionCancelled(transaction_id, "S1", "C1", "payment_refunded")


def completed(transaction_id: str) -> TransactionCompleted:
    return TransactionCompleted(transaction_id, "S1", "C1", 1000, "CAD")


def given_up(transaction_id: str) -> SagaAborted:
    return SagaAborted(transaction_id, "fulfilment", "reservation_expired", "S1", 1000, "CAD")


async def stock(harness: Harness, product: str) -> tuple[int, int, int]:
    doc = await harness.read_model("inventory.stock", f"S1:{product}")
    assert doc is not None
    return doc["on_hand"], doc["reserved"], doc["available"]


async def reservation(harness: Harness, transaction_id: str) -> dict[str, Any]:
    doc = await harness.read_model("inventory.reservations", transaction_id)
    assert doc is not None
    return doc


# -- reserving -------------------------------------------------------------------------


async def test_a_payment_reserves_every_line_until_the_expiry(harness: Harness) -> None:
    await stocked(harness, P1=5, P2=2)
    [result] = await send(harness, "T1", paid("T1", ("P1", 3), ("P2", 2)))
    assert result.outcome is Outcome.HANDLED
    [reserved] = await harness.emitted(InventoryReserved)
    assert reserved.lines == (StockLine("P1", 3), StockLine("P2", 2))
    assert reserved.store_id == "S1"
    assert datetime.fromisoformat(reserved.expires_at) == NOW + timedelta(seconds=TTL)
    assert await stock(harness, "P1") == (5, 3, 2)
    assert await stock(harness, "P2") == (2, 2, 0)
    doc = await reservation(harness, "T1")
    assert doc["status"] == "RESERVED"
    assert doc["reservation_id"] == reserved.reservation_id
    assert doc["fulfilled"] is False


async def test_what_the_inventory_emits_belongs_to_the_transaction_saga(
    harness: Harness,
) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 1)))
    log = await harness.store.read_stream("reservation-T1")
    assert [(e.type, e.correlation_id) for e in log] == [("InventoryReserved", "T1")]


async def test_a_short_line_reserves_nothing_and_says_what_is_missing(
    harness: Harness,
) -> None:
    await stocked(harness, P1=5, P2=1)
    await send(harness, "T1", paid("T1", ("P1", 2), ("P2", 3)))
    [unavailable] = await harness.emitted(InventoryUnavailable)
    assert unavailable.missing == (MissingLine("P2", 3, 1),)
    assert await harness.emitted(InventoryReserved, StockReserved) == []
    assert await stock(harness, "P1") == (5, 0, 5)
    assert await stock(harness, "P2") == (1, 0, 1)
    assert (await reservation(harness, "T1"))["status"] == "UNAVAILABLE"


async def test_a_never_stocked_product_is_unavailable(harness: Harness) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 1), ("P9", 1)))
    [unavailable] = await harness.emitted(InventoryUnavailable)
    assert unavailable.missing == (MissingLine("P9", 1, 0),)
    assert await stock(harness, "P1") == (5, 0, 5)


async def test_duplicate_product_lines_are_reserved_as_one(harness: Harness) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 2), ("P1", 3)))
    [reserved] = await harness.emitted(InventoryReserved)
    assert reserved.lines == (StockLine("P1", 5),)
    assert await stock(harness, "P1") == (5, 5, 0)


async def test_duplicate_lines_are_summed_before_checking_stock(harness: Harness) -> None:
    await stocked(harness, P1=4)
    await send(harness, "T1", paid("T1", ("P1", 2), ("P1", 3)))
    [unavailable] = await harness.emitted(InventoryUnavailable)
    assert unavailable.missing == (MissingLine("P1", 5, 4),)
    assert await stock(harness, "P1") == (4, 0, 4)


async def test_a_payment_delivered_again_reserves_once(harness: Harness) -> None:
    await stocked(harness, P1=5)
    [event] = await harness.given("payment", "pay-T1", paid("T1", ("P1", 2)), correlation_id="T1")
    first = await harness.deliver("inventory", INVENTORY, event)
    again = await harness.deliver("inventory", INVENTORY, event)
    [other_copy] = await send(harness, "T1", paid("T1", ("P1", 2)))
    assert (first.outcome, again.outcome) == (Outcome.HANDLED, Outcome.DUPLICATE)
    assert other_copy.outcome is Outcome.HANDLED
    assert len(await harness.emitted(InventoryReserved)) == 1
    assert await stock(harness, "P1") == (5, 2, 3)


@pytest.mark.parametrize(("per_sale", "sold"), [(1, 5), (2, 4)])
async def test_concurrent_payments_for_the_same_product_never_oversell(
    harness: Harness, per_sale: int, sold: int
) -> None:
    await stocked(harness, P1=5)
    payments = []
    for n in range(20):
        payments += await harness.given(
            "payment", f"pay-T{n}", paid(f"T{n}", ("P1", per_sale)), correlation_id=f"T{n}"
        )
    pending = payments
    for _ in range(20):  # the bus redelivers what failed (here: lost version races)
        results = await asyncio.gather(
            *(harness.deliver("inventory", INVENTORY, e) for e in pending)
        )
        pending = [e for e, r in zip(pending, results, strict=True)
                   if r.outcome is Outcome.FAILED]
        if not pending:
            break
    assert pending == []
    reserved = await harness.emitted(InventoryReserved)
    assert sum(line.quantity for r in reserved for line in r.lines) == sold
    assert len(await harness.emitted(InventoryUnavailable)) == 20 - len(reserved)
    assert await stock(harness, "P1") == (5, sold, 5 - sold)
    on_hand = reserved_units = 0
    for event in await harness.store.read_stream("stock-S1:P1"):
        move = SCHEMAS.validate(event)
        on_hand += move.quantity if isinstance(move, StockAdded) else 0
        reserved_units += move.quantity if isinstance(move, StockReserved) else 0
        assert 0 <= reserved_units <= on_hand


# -- compensations and completion ----------------------------------------------------


async def test_cancelling_a_transaction_gives_its_stock_back(harness: Harness) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 2)), cancelled("T1"))
    [released] = await harness.emitted(InventoryReleased)
    assert released.reason == "transaction_cancelled"
    assert released.lines == (StockLine("P1", 2),)
    assert len(await harness.emitted(StockReleased)) == 1
    assert await stock(harness, "P1") == (5, 0, 5)
    assert (await reservation(harness, "T1"))["status"] == "RELEASED"


async def test_a_failed_fulfilment_gives_the_stock_back(harness: Harness) -> None:
    await stocked(harness, P1=5)
    failure = OrderFulfillmentFailed("T1", "S1", "store_closed")
    await send(harness, "T1", paid("T1", ("P1", 2)), failure)
    [released] = await harness.emitted(InventoryReleased)
    assert released.reason == "fulfillment_failed"
    assert await stock(harness, "P1") == (5, 0, 5)


async def test_a_released_reservation_is_not_released_twice(harness: Harness) -> None:
    await stocked(harness, P1=5)
    failure = OrderFulfillmentFailed("T1", "S1", "store_closed")
    results = await send(harness, "T1", paid("T1", ("P1", 2)), failure, cancelled("T1"))
    assert [r.outcome for r in results] == [Outcome.HANDLED] * 3
    assert len(await harness.emitted(InventoryReleased)) == 1
    assert await stock(harness, "P1") == (5, 0, 5)


async def test_completion_consumes_the_reserved_stock_in_one_event(harness: Harness) -> None:
    await stocked(harness, P1=5, P2=3)
    await send(harness, "T1", paid("T1", ("P1", 2), ("P2", 1)))
    versions = [(await harness.store.read_stream(f"stock-S1:{p}"))[-1].stream_version
                for p in ("P1", "P2")]
    await send(harness, "T1", completed("T1"), completed("T1"))
    [committed] = await harness.emitted(InventoryCommitted)
    assert committed.lines == (StockLine("P1", 2), StockLine("P2", 1))
    assert not committed.per_item_commits
    # The units left `available` at the reservation: no stock item records the commit.
    assert await harness.emitted(StockCommitted, ReservationFulfilled) == []
    assert [(await harness.store.read_stream(f"stock-S1:{p}"))[-1].stream_version
            for p in ("P1", "P2")] == versions
    assert await stock(harness, "P1") == (3, 0, 3)
    assert await stock(harness, "P2") == (2, 0, 2)
    doc = await reservation(harness, "T1")
    assert (doc["status"], doc["fulfilled"]) == ("COMMITTED", True)


def test_the_inventory_leaves_the_stores_fulfilment_to_the_transaction() -> None:
    # The transaction completes in the unit of work that records the order; its
    # TransactionCompleted commits the stock (one event, one delivery fewer per sale).
    assert "OrderFulfilled" not in INVENTORY


async def test_an_older_log_with_per_item_commits_rebuilds_the_same_read_models(
    harness: Harness,
) -> None:
    # As the inventory wrote a completed sale before issue 11: the order reported to the
    # reservation, then a commit of the reservation and of each stock item.
    await catalog(harness)
    lines = (StockLine("P1", 2), StockLine("P2", 1))
    for product, quantity in (("P1", 5), ("P2", 3)):
        await harness.given("stock", f"S1:{product}", StockAdded("S1", product, quantity))
    await harness.given(
        "reservation", "T1",
        InventoryReserved("T1", "R1", "S1", lines, NOW.isoformat()),
        ReservationFulfilled("T1"),
    )
    for line in lines:
        await harness.given(
            "stock", f"S1:{line.product_id}", StockReserved("S1", line.product_id,
                                                            line.quantity, "T1"),
        )
    committed = InventoryCommitted("T1", "R1", "S1", lines)
    old = SCHEMAS.dump(committed)
    del old["per_item_commits"]  # the field is new: older payloads lack it
    async with harness.store.transaction() as uow:
        uow.append("reservation-T1", [NewEvent("InventoryCommitted", old)], expected_version=2)
        for line in lines:
            key = f"stock-S1:{line.product_id}"
            uow.append(key, [NewEvent("StockCommitted", SCHEMAS.dump(StockCommitted(
                "S1", line.product_id, line.quantity, "T1")))], expected_version=2)
    assert await stock(harness, "P1") == (3, 0, 3)
    assert await stock(harness, "P2") == (2, 0, 2)
    doc = await reservation(harness, "T1")
    assert (doc["status"], doc["fulfilled"]) == ("COMMITTED", True)
    assert await lines_as_of(harness) == [(3, 0, 3), (2, 0, 2)]

    # The aggregates load from those streams, and go on: the stock left can be promised.
    await send(harness, "T2", paid("T2", ("P1", 3), ("P2", 2)))
    assert (await reservation(harness, "T2"))["status"] == "RESERVED"
    await send(harness, "T3", paid("T3", ("P1", 1)))
    assert (await reservation(harness, "T3"))["status"] == "UNAVAILABLE"
    await send(harness, "T1", completed("T1"))  # a redelivery: committed already
    await send(harness, "T2", completed("T2"))
    assert await stock(harness, "P1") == (0, 0, 0)
    assert await stock(harness, "P2") == (0, 0, 0)
    assert await lines_as_of(harness) == [(0, 0, 0), (0, 0, 0)]


async def lines_as_of(harness: Harness) -> list[tuple[int, int, int]]:
    """The stock lines of S1 as time travel replays them from the log (now)."""
    lines = await history.stock_as_of(harness.store, NOW + timedelta(days=3650), "S1")
    return [(x["on_hand"], x["reserved"], x["available"]) for x in lines]


async def test_a_cancellation_before_the_payment_voids_the_reservation(
    harness: Harness,
) -> None:
    await stocked(harness, P1=5)
    results = await send(harness, "T1", cancelled("T1"), paid("T1", ("P1", 2)))
    assert [r.outcome for r in results] == [Outcome.HANDLED] * 2
    [voided] = await harness.emitted(ReservationVoided)
    assert voided.reason == "transaction_cancelled"
    assert await harness.emitted(InventoryReserved, InventoryUnavailable) == []
    assert await stock(harness, "P1") == (5, 0, 5)
    assert (await reservation(harness, "T1"))["status"] == "VOIDED"


async def test_a_cancellation_another_process_handled_first_still_voids_the_reservation(
    harness: Harness,
) -> None:
    """The payment's delivery takes the sale's reservation for missing without reading it
    (this process never saw it): the voided one another process wrote makes that commit
    fail, and the retry reads it and reserves nothing."""
    await stocked(harness, P1=5)
    assert isinstance(harness.store, SqliteEventStore)
    async with SqliteEventStore(harness.store.path) as other:
        await send(Harness(other), "T1", cancelled("T1"))
    assert [r.outcome for r in await send(harness, "T1", paid("T1", ("P1", 2)))] == [
        Outcome.HANDLED]
    assert await harness.emitted(InventoryReserved, InventoryUnavailable) == []
    assert await stock(harness, "P1") == (5, 0, 5)
    assert (await reservation(harness, "T1"))["status"] == "VOIDED"


async def test_a_cancellation_after_an_unavailable_reservation_changes_nothing(
    harness: Harness,
) -> None:
    await stocked(harness, P1=1)
    await send(harness, "T1", paid("T1", ("P1", 2)), cancelled("T1"))
    assert await harness.emitted(InventoryReleased, ReservationVoided) == []
    assert (await reservation(harness, "T1"))["status"] == "UNAVAILABLE"


async def test_completion_or_failed_fulfilment_before_the_reservation_is_retried_later(
    harness: Harness,
) -> None:
    await stocked(harness, P1=5)
    failure = OrderFulfillmentFailed("T1", "S1", "store_closed")
    results = await send(harness, "T1", completed("T1"), failure)
    assert [r.outcome for r in results] == [Outcome.FAILED] * 2
    assert "before its reservation" in results[0].reason
    assert await harness.read_model("inventory.reservations", "T1") is None


# -- expiry ---------------------------------------------------------------------------


async def test_expiry_is_reported_only_for_held_reservations_past_due(
    harness: Harness,
) -> None:
    await stocked(harness, P1=10)
    await send(harness, "T1", paid("T1", ("P1", 1)))
    await send(harness, "T2", paid("T2", ("P1", 2)), completed("T2"))
    later = handlers(TTL, clock=lambda: NOW + timedelta(hours=1))
    [event] = await harness.given("payment", "pay-T3", paid("T3", ("P1", 3)),
                                  correlation_id="T3")
    await harness.deliver("inventory", later, event)
    await project_all(harness.store)
    due = NOW + timedelta(seconds=TTL)

    assert await expire_reservations(harness.store, due - timedelta(seconds=1)) == 0
    assert await expire_reservations(harness.store, due) == 1
    await project_all(harness.store)
    assert await expire_reservations(harness.store, due) == 0  # reported once

    [expired] = await harness.emitted(ReservationExpired)
    assert expired.transaction_id == "T1"
    assert [e.correlation_id for e in await harness.store.read_stream("reservation-T1")] == [
        "T1", "T1",
    ]
    # The stock stays held: the transaction decides (here: it gives the sale up).
    assert await stock(harness, "P1") == (8, 4, 4)
    await send(harness, "T1", given_up("T1"))
    [released] = await harness.emitted(InventoryReleased)
    assert (released.transaction_id, released.reason) == ("T1", "expired")
    assert await stock(harness, "P1") == (8, 3, 5)
    assert [(await reservation(harness, t))["status"] for t in ("T1", "T2", "T3")] == [
        "RELEASED", "COMMITTED", "RESERVED",
    ]


async def test_an_expired_reservation_whose_sale_completed_first_is_committed(
    harness: Harness,
) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 2)))
    await expire_reservations(harness.store, NOW + timedelta(days=1))
    # The store's fulfilment reached the transaction before the expiry did: it completed.
    await send(harness, "T1", completed("T1"))
    assert await harness.emitted(InventoryReleased) == []
    assert await stock(harness, "P1") == (3, 0, 3)


async def test_an_expired_reservation_is_released_once_by_a_cancellation(
    harness: Harness,
) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 2)))
    await expire_reservations(harness.store, NOW + timedelta(days=1))
    await send(harness, "T1", given_up("T1"), cancelled("T1"))
    assert len(await harness.emitted(InventoryReleased)) == 1
    assert await stock(harness, "P1") == (5, 0, 5)


async def test_the_expiry_loop_keeps_sweeping_after_a_failure(harness: Harness) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 2)))
    calls = 0
    third_sweep = asyncio.Event()

    def flaky_clock() -> datetime:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("clock broken")
        if calls == 3:
            third_sweep.set()  # the loop is sequential: the second sweep is over
        return NOW + timedelta(days=1)

    task = asyncio.create_task(expiry_loop(harness.store, 0.01, flaky_clock)())
    try:
        await asyncio.wait_for(third_sweep.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [expired] = await harness.emitted(ReservationExpired)
    assert expired.transaction_id == "T1"
    assert await stock(harness, "P1") == (5, 2, 3)


# -- restocking -------------------------------------------------------------------------


async def test_restock_adds_to_the_stock_and_returns_the_line(harness: Harness) -> None:
    await stocked(harness, P1=5)
    await send(harness, "T1", paid("T1", ("P1", 2)))
    line = await restock(harness.store, "S1", "P1", 4, reason="delivery")
    assert line == {"store_id": "S1", "product_id": "P1", "on_hand": 9, "reserved": 2,
                    "available": 7}
    assert [(a.quantity, a.reason) for a in await harness.emitted(StockAdded)] == [
        (5, "restock"), (4, "delivery"),
    ]


async def test_restock_refuses_unknown_stores_and_products(harness: Harness) -> None:
    await catalog(harness)
    with pytest.raises(NotFound, match="no store S9"):
        await restock(harness.store, "S9", "P1", 1)
    with pytest.raises(NotFound, match="no product P9"):
        await restock(harness.store, "S1", "P9", 1)
    assert await harness.emitted(StockAdded) == []


@pytest.mark.parametrize(("quantity", "reason"), [(0, "restock"), (-3, "restock"), (1, "  ")])
async def test_restock_refuses_bad_input(harness: Harness, quantity: int, reason: str) -> None:
    await catalog(harness)
    with pytest.raises(InvalidInput):
        await restock(harness.store, "S1", "P1", quantity, reason)
    assert await harness.emitted(StockAdded) == []


async def test_restocks_racing_reservations_all_count(harness: Harness) -> None:
    await stocked(harness, P1=5)
    payments = []
    for n in range(5):
        payments += await harness.given(
            "payment", f"pay-T{n}", paid(f"T{n}", ("P1", 1)), correlation_id=f"T{n}"
        )
    await asyncio.gather(
        *(restock(harness.store, "S1", "P1", 1) for _ in range(5)),
        *(harness.deliver("inventory", INVENTORY, e) for e in payments),
    )
    on_hand, reserved, _ = await stock(harness, "P1")
    assert on_hand == 10
    assert reserved == len(await harness.emitted(InventoryReserved))


# -- orchestrated sales: the same reservation code, on the orchestrator's commands ----------


async def test_reserve_and_release_stock_commands_hold_then_give_back(harness: Harness) -> None:
    await stocked(harness, P1=5)
    lines = (SaleLine("P1", 3, 250),)
    await send(harness, "T9", ReserveStock("T9:2", "transaction", "T9", "S1", lines))
    assert await stock(harness, "P1") == (5, 3, 2)
    assert (await reservation(harness, "T9"))["status"] == "RESERVED"
    await send(harness, "T9", ReleaseStock("T9:5", "transaction", "T9", "fulfillment_failed:x"))
    assert await stock(harness, "P1") == (5, 0, 5)


async def test_an_orchestrated_payment_reserves_nothing_by_itself(harness: Harness) -> None:
    await stocked(harness, P1=5)
    [event] = await harness.store.append("other-T8", [NewEvent(
        "PaymentProcessed", SCHEMAS.dump(paid("T8", ("P1", 3))), correlation_id="T8",
        metadata={"baggage": {"saga_mode": "orchestration"}})])
    assert (await harness.deliver("inventory", INVENTORY, event)).outcome is Outcome.HANDLED
    assert await stock(harness, "P1") == (5, 0, 5)
