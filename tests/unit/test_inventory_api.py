"""The inventory's HTTP routes on a bare FastAPI app with a temporary store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from magasin.api.errors import install
from magasin.config import Settings
from magasin.inventory.api import router
from magasin.inventory.handlers import handlers
from magasin.inventory.service import build
from magasin.messaging.dispatch import Outcome, check_handlers
from magasin.service import ServiceContext
from magasin.shared.events import (
    SCHEMAS,
    OrderFulfillmentFailed,
    PaymentProcessed,
    ProductAdded,
    StockLine,
    StoreRegistered,
)
from tests.unit.conftest import Harness, ProjectingTransport

INVENTORY = handlers(600.0)


@pytest.fixture
async def client(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    install(app)
    app.include_router(router(ServiceContext(harness.store, Settings())))
    events = await harness.given("store", "S1", StoreRegistered("S1", "Centre", "D1", "1 rue"))
    for product in ("P1", "P2", "P3"):
        events += await harness.given(
            "product", product, ProductAdded(product, f"SKU-{product}", product, 100, "CAD")
        )
    for event in events:
        assert (await harness.deliver("inventory", INVENTORY, event)).outcome is Outcome.HANDLED
    async with httpx.AsyncClient(
        transport=ProjectingTransport(app, harness.store), base_url="http://t"
    ) as http:
        yield http


async def test_restock_returns_the_updated_stock_line(client: httpx.AsyncClient) -> None:
    await client.post("/api/stock/S1/P1/restock", json={"quantity": 5})
    response = await client.post(
        "/api/stock/S1/P1/restock", json={"quantity": 3, "reason": "delivery"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "store_id": "S1", "product_id": "P1", "on_hand": 8, "reserved": 0, "available": 8,
    }
    assert (await client.get("/api/stock/S1/P1")).json()["on_hand"] == 8


@pytest.mark.parametrize(
    "body",
    [
        {"quantity": 0},
        {"quantity": -1},
        {"quantity": 1.5},
        {"quantity": "3"},
        {"quantity": 10**12},
        {"quantity": 1, "reason": ""},
        {"quantity": 1, "colour": "red"},
        {},
    ],
)
async def test_restock_refuses_invalid_bodies_and_changes_nothing(
    client: httpx.AsyncClient, body: dict[str, object]
) -> None:
    response = await client.post("/api/stock/S1/P1/restock", json=body)
    assert response.status_code == 422
    assert (await client.get("/api/stock/S1/P1")).json()["on_hand"] == 0


async def test_restock_of_an_unknown_store_or_product_is_not_found(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/api/stock/S9/P1/restock", "/api/stock/S1/P9/restock"):
        response = await client.post(path, json={"quantity": 1})
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"


async def test_stock_of_a_known_product_never_stocked_is_zero(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/api/stock/S1/P2")
    assert response.status_code == 200
    assert response.json()["available"] == 0


async def test_stock_of_an_unknown_store_or_product_is_not_found(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/api/stock/S1/P9")).status_code == 404
    assert (await client.get("/api/stock/S9/P1")).status_code == 404
    assert (await client.get("/api/stock/S9")).status_code == 404


async def test_a_store_s_stock_lists_page_by_page(client: httpx.AsyncClient) -> None:
    for product, quantity in (("P3", 3), ("P1", 1), ("P2", 2)):
        await client.post(f"/api/stock/S1/{product}/restock", json={"quantity": quantity})
    first = (await client.get("/api/stock/S1", params={"limit": 2})).json()
    assert [x["product_id"] for x in first["items"]] == ["P1", "P2"]
    assert first["next_cursor"] is not None
    second = (
        await client.get("/api/stock/S1", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [(x["product_id"], x["on_hand"]) for x in second["items"]] == [("P3", 3)]
    assert second["next_cursor"] is None
    assert (await client.get("/api/stock/S1", params={"limit": 0})).status_code == 422


async def test_a_reservation_shows_what_is_held_for_a_transaction(
    client: httpx.AsyncClient, harness: Harness
) -> None:
    await client.post("/api/stock/S1/P1/restock", json={"quantity": 5})
    payment = PaymentProcessed("pay-1", "T1", 500, "CAD", "B1", "S1", (StockLine("P1", 2),))
    [event] = await harness.given("payment", "pay-1", payment, correlation_id="T1")
    await harness.deliver("inventory", INVENTORY, event)

    response = await client.get("/api/reservations/T1")
    assert response.status_code == 200
    body = response.json()
    assert (body["transaction_id"], body["status"], body["fulfilled"]) == ("T1", "RESERVED", False)
    assert body["lines"] == [{"product_id": "P1", "quantity": 2}]
    assert body["reservation_id"]
    assert body["expires_at"]
    assert (await client.get("/api/stock/S1/P1")).json()["available"] == 3


async def test_one_reservation_reads_as_its_stream_has_it_while_the_read_model_lags(
    harness: Harness,
) -> None:
    """Seed 6.2.2: a reservation not projected yet, or projected before its release, is
    replayed from its events (no projection runs here: a plain ASGI transport)."""
    app = FastAPI()
    install(app)
    app.include_router(router(ServiceContext(harness.store, Settings())))
    setup = await harness.given("store", "S1", StoreRegistered("S1", "Centre", "D1", "1 rue"))
    setup += await harness.given("product", "P1", ProductAdded("P1", "SKU-P1", "P1", 100, "CAD"))
    for event in setup:
        await harness.deliver("inventory", INVENTORY, event)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        assert (await http.post("/api/stock/S1/P1/restock", json={"quantity": 5})).is_success
        payment = PaymentProcessed("pay-1", "T1", 500, "CAD", "B1", "S1", (StockLine("P1", 2),))
        [paid] = await harness.given("payment", "pay-1", payment, correlation_id="T1")
        await harness.deliver("inventory", INVENTORY, paid)
        held = await http.get("/api/reservations/T1")
        assert held.status_code == 200, held.text
        assert (held.json()["status"], held.json()["lines"]) == (
            "RESERVED", [{"product_id": "P1", "quantity": 2}])

        await harness.read_model("inventory.reservations", "T1")  # projected as RESERVED
        failed = OrderFulfillmentFailed("T1", "S1", "no_staff")
        [event] = await harness.given("order", "T1", failed, correlation_id="T1")
        await harness.deliver("inventory", INVENTORY, event)
        released = (await http.get("/api/reservations/T1")).json()
        assert released["status"] == "RELEASED" and released["reason"]

        await harness.read_model("inventory.reservations", "T1")
        assert (await http.get("/api/reservations/T1")).json() == released


async def test_an_unknown_reservation_is_not_found(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/reservations/T404")
    assert response.status_code == 404
    assert "T404" in response.json()["detail"]


async def test_the_service_runs_the_inventory_consumer_routes_and_sweeper(
    harness: Harness,
) -> None:
    service = build(ServiceContext(harness.store, Settings(reservation_ttl_s=60)))
    assert service.name == "inventory"
    check_handlers("inventory", dict(service.consumers["inventory"]), SCHEMAS)
    assert {"PaymentProcessed", "TransactionCompleted", "TransactionCancelled"} <= set(
        service.consumers["inventory"]
    )
    assert service.router is not None
    assert len(service.loops) == 1
