"""A store that fulfils an order after the sale's reservation expired (embedded). The rule:
the transaction decides; an expired reservation gives a still-waiting sale up (refund,
release) and the late fulfilment is refused — whether the stock is still there or another
sale has taken it since."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from magasin.bootstrap import Runtime
from magasin.payments.gateway import REFUNDS
from magasin.shared.messages import RecordedEvent
from magasin.stores import handlers as store_handlers
from tests.e2e.conftest import Shop, eventually, serving
from tests.e2e.conftest import test_settings as settings_for
from tests.e2e.test_saga_deadlines import final_state, shelf

HELD: set[str] = set()
"""Sales whose order the store cannot prepare yet (retried, then dead-lettered)."""


@pytest.fixture(autouse=True)
def slow_store(monkeypatch: pytest.MonkeyPatch) -> None:
    prepare = store_handlers.prepare_order

    async def preparing(event: RecordedEvent, uow: Any) -> None:
        if "*" in HELD or event.payload["transaction_id"] in HELD:
            raise RuntimeError("the order is not ready yet")
        await prepare(event, uow)

    monkeypatch.setattr(store_handlers, "prepare_order", preparing)
    HELD.clear()


@asynccontextmanager
async def running_shop(tmp_path: Path) -> AsyncIterator[Shop]:
    # The reservation expires long before the fulfilment step's own deadline.
    runtime = Runtime.embedded(settings_for(
        tmp_path, reservation_ttl_s=1.0, reservation_sweep_s=0.1, deadline_fulfilment_s=600,
        deadline_sweep_s=0.1,
    ))
    async with serving(runtime) as running:
        yield running


async def sale_held_by_the_store(shop: Shop, store: str, product: str, quantity: int) -> str:
    """A sale whose order the store prepares only once the test requeues it."""
    body = {"store_id": store, "customer_id": "alice", "payment_method": "VISA",
            "items": [{"product_id": product, "quantity": quantity}]}
    # The id is only known once created: every sale is held until then.
    HELD.add("*")
    tid: str = (await shop.ok("POST", "/api/transactions", json=body))["transaction_id"]
    HELD.add(tid)
    HELD.discard("*")
    return tid


async def fulfil_late(shop: Shop, tid: str) -> None:
    """The store is ready: its dead-lettered preparation is requeued (and now succeeds)."""

    async def letter() -> str | None:
        page = await shop.ok("GET", "/api/dead-letters", params={"consumer": "store"})
        found = [x["id"] for x in page["items"] if x["correlation_id"] == tid]
        return found[0] if found else None

    letter_id = await eventually(letter)
    HELD.discard(tid)
    await shop.ok("POST", f"/api/dead-letters/{letter_id}/requeue")


async def event_types(shop: Shop, tid: str) -> list[str]:
    page = await shop.ok("GET", "/api/events", params={"correlation_id": tid, "limit": 500})
    return [e["type"] for e in page["items"]]


async def refused(shop: Shop, tid: str) -> list[str]:
    async def seen() -> list[str] | None:
        types = await event_types(shop, tid)
        return types if "FulfilmentRefused" in types else None

    types: list[str] = await eventually(seen)
    return types


async def bank_refunds(shop: Shop, tid: str) -> int:
    return sum(1 for key, _ in await shop.runtime.store.find_documents(REFUNDS)
               if key.startswith(tid))


async def test_a_late_fulfilment_is_refused_and_the_sale_stays_refunded(tmp_path: Path) -> None:
    async with running_shop(tmp_path) as shop:
        store, coffee = await shelf(shop)  # 10 on the shelf
        tid = await sale_held_by_the_store(shop, store, coffee, 3)

        final = await final_state(shop, tid)  # the reservation expired first
        assert (final["status"], final["reason"]) == ("CANCELLED", "reservation_expired")
        reservation = await shop.ok("GET", f"/api/reservations/{tid}")
        assert (reservation["status"], reservation["reason"]) == ("RELEASED", "expired")

        await fulfil_late(shop, tid)
        types = await refused(shop, tid)
        assert "OrderFulfilled" in types and "TransactionCompleted" not in types
        sale = await shop.ok("GET", f"/api/transactions/{tid}")
        assert (sale["status"], sale["order_id"]) == ("CANCELLED", None)
        payment = await shop.ok("GET", f"/api/payments/{tid}")
        assert (payment["status"], payment["reason"]) == ("REFUNDED", "reservation_expired")
        assert await bank_refunds(shop, tid) == 1
        line = await shop.stock(store, coffee)
        assert (line["on_hand"], line["reserved"], line["available"]) == (10, 0, 10)


async def test_a_late_fulfilment_of_stock_another_sale_took_is_refused_too(
    tmp_path: Path,
) -> None:
    async with running_shop(tmp_path) as shop:
        store, coffee = await shelf(shop)
        late = await sale_held_by_the_store(shop, store, coffee, 10)
        assert (await final_state(shop, late))["reason"] == "reservation_expired"

        # The stock went back on the shelves and another customer bought all of it.
        other = (await shop.sell(store, [(coffee, 10)]))["transaction_id"]
        assert (await final_state(shop, other))["status"] == "COMPLETED"

        await fulfil_late(shop, late)
        await refused(shop, late)
        assert (await shop.ok("GET", f"/api/transactions/{late}"))["status"] == "CANCELLED"
        assert (await shop.ok("GET", f"/api/payments/{late}"))["status"] == "REFUNDED"
        assert (await shop.ok("GET", f"/api/payments/{other}"))["status"] == "CAPTURED"
        line = await shop.stock(store, coffee)
        assert (line["on_hand"], line["reserved"], line["available"]) == (0, 0, 0)
        reservation = await shop.ok("GET", f"/api/reservations/{other}")
        assert reservation["status"] == "COMMITTED"
