"""The audit service end to end in embedded mode: a saga's events in its trail, in order and
tagged by compliance scope; range queries and CSV export; alerts; an intact chain."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from magasin.bootstrap import Runtime
from magasin.observability.metrics import AUDIT_ALERTS
from tests.e2e import conftest as e2e
from tests.e2e.conftest import Shop, eventually, serving

SAGA_AND_AUDIT = ("transaction", "payment", "inventory", "store", "audit")


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    """The saga's services and the audit service, embedded."""
    runtime = Runtime.embedded(e2e.test_settings(tmp_path), services=SAGA_AND_AUDIT)
    async with serving(runtime) as running:
        yield running


async def trail_until(shop: Shop, transaction_id: str, last_type: str) -> list[dict[str, Any]]:
    async def complete() -> list[dict[str, Any]] | None:
        entries: list[dict[str, Any]] = await shop.ok("GET", f"/api/audit/trail/{transaction_id}")
        return entries if any(e["event_type"] == last_type for e in entries) else None

    found: list[dict[str, Any]] = await eventually(complete)
    return found


async def stocked_shop(shop: Shop, quantity: int = 5) -> tuple[str, str]:
    store_id = await shop.open_store()
    product_id = await shop.add_product("SKU-AUDIT", 1250)
    await shop.restock(store_id, product_id, quantity)
    return store_id, product_id


async def test_a_completed_sale_leaves_its_whole_saga_in_the_trail_in_order(shop: Shop) -> None:
    store_id, product_id = await stocked_shop(shop)
    sale = await shop.sell(store_id, [(product_id, 2)])

    trail = await trail_until(shop, sale["transaction_id"], "InventoryCommitted")
    types = [e["event_type"] for e in trail]
    saga = ["TransactionCreated", "PaymentProcessed", "InventoryReserved", "OrderFulfilled",
            "TransactionCompleted"]
    assert [t for t in types if t in saga] == saga
    scopes = {e["event_type"]: e["scopes"] for e in trail}
    assert scopes["TransactionCreated"] == ["GDPR"]
    assert scopes["PaymentProcessed"] == ["PCI-DSS", "SOX"]
    assert scopes["TransactionCompleted"] == ["GDPR", "SOX"]
    assert scopes["InventoryReserved"] == []
    assert all(e["correlation_id"] == sale["transaction_id"] for e in trail)


async def test_the_chain_of_a_busy_shop_verifies(shop: Shop) -> None:
    store_id, product_id = await stocked_shop(shop)
    sales = [await shop.sell(store_id, [(product_id, 1)]) for _ in range(3)]
    for sale in sales:
        await trail_until(shop, sale["transaction_id"], "TransactionCompleted")

    report = await shop.ok("GET", "/api/audit/verify")
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["checked"] == report["head"] > 20


async def test_a_failed_payment_is_flagged_by_an_alert(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    store_id, product_id = await stocked_shop(shop)
    before = AUDIT_ALERTS.labels(kind="payment_failed")._value.get()
    with caplog.at_level(logging.WARNING, logger="magasin.audit.alerts"):
        sale = await shop.sell(store_id, [(product_id, 1)], payment_method="FAIL_CARD")
        trail = await trail_until(shop, sale["transaction_id"], "TransactionCancelled")
    assert "PCI-DSS" in next(e for e in trail if e["event_type"] == "PaymentFailed")["scopes"]
    assert AUDIT_ALERTS.labels(kind="payment_failed")._value.get() == before + 1
    assert any("payment_failed" in r.getMessage() and sale["transaction_id"] in r.getMessage()
               for r in caplog.records)


async def test_an_inventory_shortage_is_flagged_by_an_alert(shop: Shop) -> None:
    store_id, product_id = await stocked_shop(shop, quantity=1)
    before = AUDIT_ALERTS.labels(kind="inventory_unavailable")._value.get()
    sale = await shop.sell(store_id, [(product_id, 3)])
    await trail_until(shop, sale["transaction_id"], "TransactionCancelled")
    assert AUDIT_ALERTS.labels(kind="inventory_unavailable")._value.get() == before + 1


async def test_the_log_filters_by_type_pages_and_exports_csv(shop: Shop) -> None:
    store_id, product_id = await stocked_shop(shop)
    sales = [await shop.sell(store_id, [(product_id, 1)]) for _ in range(3)]
    for sale in sales:
        await trail_until(shop, sale["transaction_id"], "TransactionCompleted")

    first = await shop.ok("GET", "/api/audit", params={"type": "TransactionCompleted",
                                                        "limit": 2})
    assert len(first["items"]) == 2
    rest = await shop.ok("GET", "/api/audit", params={"type": "TransactionCompleted",
                                                       "limit": 2,
                                                       "cursor": first["next_cursor"]})
    assert rest["next_cursor"] is None
    completed = {e["correlation_id"] for e in first["items"] + rest["items"]}
    assert completed == {s["transaction_id"] for s in sales}

    future = await shop.ok("GET", "/api/audit", params={"from": "2999-01-01T00:00:00Z"})
    assert future["items"] == []

    response = await shop.client.get("/api/audit", params={"type": "PaymentProcessed"},
                                     headers={"Accept": "text/csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {r["correlation_id"] for r in rows} == {s["transaction_id"] for s in sales}
    assert all(r["scopes"] == "PCI-DSS;SOX" for r in rows)


async def test_a_range_without_time_zone_is_refused(shop: Shop) -> None:
    response = await shop.client.get("/api/audit", params={"from": "2026-01-01T00:00:00"})
    assert response.status_code == 400
