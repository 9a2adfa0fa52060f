"""Every seed flow (06_runtime_view §6.1, §6.3) end to end over HTTP in embedded mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from magasin.bootstrap import Runtime
from magasin.messaging.partitioning import configured_partitions, partition_of
from tests.e2e import conftest
from tests.e2e.conftest import Shop, eventually, serving


@pytest.fixture(params=["choreography", "orchestration"])
async def shop(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Shop]:
    """Every flow runs under both coordinations, with the same assertions on the outcome."""
    settings = conftest.test_settings(tmp_path, saga_mode=request.param)
    async with serving(Runtime.embedded(settings)) as running:
        yield running


@pytest.fixture
async def shelf(shop: Shop) -> dict[str, str]:
    store = await shop.open_store()
    coffee = await shop.add_product("CAF-1", 1899)
    milk = await shop.add_product("LAI-2", 649)
    tv = await shop.add_product("TV-9", 1_099_999)
    for product in (coffee, milk, tv):
        await shop.restock(store, product, 10)
    return {"store": store, "coffee": coffee, "milk": milk, "tv": tv}


async def event_types(shop: Shop, transaction_id: str) -> list[str]:
    types = []
    after = 0
    while page := await shop.runtime.store.read_all(after=after, limit=1000):
        types += [e.type for e in page if e.correlation_id == transaction_id]
        after = page[-1].global_position
    return types


async def test_a_paid_sale_with_stock_completes_and_consumes_the_stock(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 2), (shelf["milk"], 1)])
    assert sale["status"] == "PENDING"
    assert sale["total"] == 2 * 1899 + 649  # priced from the catalog

    final = await shop.final(sale["transaction_id"])

    assert final["status"] == "COMPLETED"
    assert [h["status"] for h in final["history"]] == [
        "PENDING", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "FULFILLED", "COMPLETED",
    ]
    payment = await shop.ok("GET", f"/api/payments/{sale['transaction_id']}")
    assert (payment["status"], payment["amount"]) == ("CAPTURED", sale["total"])
    order = await shop.ok("GET", f"/api/orders/{sale['transaction_id']}")
    assert order["status"] == "FULFILLED"

    async def committed() -> bool:
        line = await shop.stock(shelf["store"], shelf["coffee"])
        return bool(line["on_hand"] == 8 and line["reserved"] == 0)

    await eventually(committed)
    types = await event_types(shop, sale["transaction_id"])
    for step in ("TransactionCreated", "PaymentProcessed", "InventoryReserved",
                 "OrderFulfilled", "TransactionCompleted", "InventoryCommitted"):
        assert step in types
    assert types.index("PaymentProcessed") < types.index("InventoryReserved")
    assert types.index("OrderFulfilled") < types.index("TransactionCompleted")


async def test_a_declined_card_cancels_the_sale_without_touching_stock(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 1)], payment_method="FAIL_CARD")

    final = await shop.final(sale["transaction_id"])

    assert (final["status"], final["reason"]) == ("CANCELLED", "declined")
    payment = await shop.ok("GET", f"/api/payments/{sale['transaction_id']}")
    assert payment["status"] == "FAILED"
    line = await shop.stock(shelf["store"], shelf["coffee"])
    assert (line["on_hand"], line["reserved"]) == (10, 0)
    types = await event_types(shop, sale["transaction_id"])
    assert "PaymentFailed" in types and "TransactionCancelled" in types
    assert "InventoryReserved" not in types


async def test_an_amount_over_the_bank_limit_is_declined(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["tv"], 1)])
    final = await shop.final(sale["transaction_id"])
    assert (final["status"], final["reason"]) == ("CANCELLED", "limit_exceeded")


async def test_inventory_unavailable_refunds_then_cancels(
    shop: Shop, shelf: dict[str, str]
) -> None:
    sale = await shop.sell(shelf["store"], [(shelf["milk"], 1), (shelf["coffee"], 11)])

    final = await shop.final(sale["transaction_id"])

    assert (final["status"], final["reason"]) == ("CANCELLED", "inventory_unavailable")
    payment = await shop.ok("GET", f"/api/payments/{sale['transaction_id']}")
    assert payment["status"] == "REFUNDED"
    types = await event_types(shop, sale["transaction_id"])
    assert types.index("InventoryUnavailable") < types.index("PaymentRefunded")
    assert types.index("PaymentRefunded") < types.index("TransactionCancelled")
    milk = await shop.stock(shelf["store"], shelf["milk"])
    assert (milk["on_hand"], milk["reserved"]) == (10, 0), "all lines or none are reserved"


async def test_a_store_that_cannot_fulfil_releases_refunds_and_cancels(
    shop: Shop, shelf: dict[str, str]
) -> None:
    await shop.ok("POST", f"/api/stores/{shelf['store']}/close", json={"reason": "flood"})
    sale = await shop.sell(shelf["store"], [(shelf["coffee"], 3)])

    final = await shop.final(sale["transaction_id"])

    assert final["status"] == "CANCELLED"
    assert final["reason"] == "fulfillment_failed:store_closed"
    payment = await shop.ok("GET", f"/api/payments/{sale['transaction_id']}")
    assert payment["status"] == "REFUNDED"
    line = await shop.stock(shelf["store"], shelf["coffee"])
    assert (line["on_hand"], line["reserved"], line["available"]) == (10, 0, 10)
    types = await event_types(shop, sale["transaction_id"])
    assert types.index("OrderFulfillmentFailed") < types.index("TransactionCancelled")
    assert types.index("InventoryReleased") < types.index("TransactionCancelled")
    assert types.index("PaymentRefunded") < types.index("TransactionCancelled")


async def test_the_sale_runs_under_the_configured_coordination(
    shop: Shop, shelf: dict[str, str], request: pytest.FixtureRequest
) -> None:
    """Orchestrated: the trail holds the orchestrator's commands; choreographed: none."""
    sale = await shop.sell(shelf["store"], [(shelf["milk"], 1)])
    assert (await shop.final(sale["transaction_id"]))["status"] == "COMPLETED"
    types = await event_types(shop, sale["transaction_id"])
    commands = [t for t in types if t in ("ChargePayment", "ReserveStock", "PrepareOrder")]
    if request.node.callspec.params["shop"] == "orchestration":
        assert commands == ["ChargePayment", "ReserveStock", "PrepareOrder"]
        assert "OrchestrationEnded" in types
    else:
        assert commands == [] and "OrchestrationStarted" not in types


async def test_every_event_of_a_sale_carries_its_customers_partition(
    shop: Shop, shelf: dict[str, str]
) -> None:
    """Seed 6.8.1: the partition of a sale is stable_hash(customerId) % N, on every event
    of the sale (the services' reactions inherit it), as the event store API shows it."""
    paid = await shop.sell(shelf["store"], [(shelf["coffee"], 1)])
    declined = await shop.sell(shelf["store"], [(shelf["milk"], 1)],
                               payment_method="FAIL_CARD")
    expected = partition_of("alice", configured_partitions())
    for sale in (paid, declined):
        await shop.final(sale["transaction_id"])
        page = await shop.ok("GET", "/api/events",
                             params={"correlation_id": sale["transaction_id"], "limit": 500})
        stamps = {(e["type"], e["metadata"].get("partition_key"), e["metadata"].get("partition"))
                  for e in page["items"] if e["type"] != "AuditEntryRecorded"}  # audit's own
        assert len(stamps) >= 4  # created, then several services' reactions
        assert {(key, part) for _, key, part in stamps} == {("alice", expected)}, stamps
