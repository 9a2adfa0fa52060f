"""HTTP API of the store service, mounted alone on a bare FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from magasin.api import errors
from magasin.config import Settings
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.messaging.dispatch import deliver
from magasin.service import ServiceContext
from magasin.shared.events import SCHEMAS, InventoryReserved, StockLine
from magasin.shared.ids import stream_id
from magasin.shared.messages import NewEvent
from magasin.stores.api import router
from magasin.stores.handlers import handlers
from tests.unit.conftest import ProjectingTransport

STORE = {"name": "Plateau", "district": "Montréal", "address": "1 rue Saint-Denis"}
PRODUCT = {"sku": "SKU-1", "name": "Café", "unit_price": 499, "currency": "CAD"}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    async with SqliteEventStore(tmp_path / "api.db") as s:
        yield s


@pytest.fixture
async def client(store: SqliteEventStore, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    errors.install(app)
    app.include_router(router(ServiceContext(store, Settings(data_dir=tmp_path))))
    transport = ProjectingTransport(app, store)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def post_store(client: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    response = await client.post("/api/stores", json={**STORE, **changes})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def messages(response: httpx.Response) -> list[tuple[str, str]]:
    """(field, message) of each pydantic error in a 422 answer."""
    return [(str(e["loc"][-1]), e["msg"]) for e in response.json()["detail"]]


# -- stores -----------------------------------------------------------------------------


async def test_registering_a_store_answers_201_with_its_location(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/api/stores", json={**STORE, "name": "  Plateau  "})
    assert response.status_code == 201
    body = response.json()
    assert body == {"store_id": body["store_id"], "name": "Plateau", "district": "Montréal",
                    "address": "1 rue Saint-Denis", "open": True, "closed_reason": None}
    assert response.headers["Location"] == f"/api/stores/{body['store_id']}"
    assert (await client.get(response.headers["Location"])).json() == body


async def test_an_unknown_store_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/stores/nowhere")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "no store nowhere"}


async def test_a_store_without_a_name_is_422_and_nothing_is_written(
    client: httpx.AsyncClient, store: SqliteEventStore
) -> None:
    response = await client.post("/api/stores", json={**STORE, "name": "   "})
    assert response.status_code == 422
    assert messages(response) == [("name", "String should have at least 1 character")]
    missing = await client.post("/api/stores", json={"name": "Plateau"})
    assert {field for field, _ in messages(missing)} == {"district", "address"}
    assert await store.last_position() == 0


async def test_an_unknown_field_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/stores", json={**STORE, "manager": "Ana"})
    assert response.status_code == 422
    assert messages(response) == [("manager", "Extra inputs are not permitted")]


async def test_closing_and_reopening_a_store(client: httpx.AsyncClient) -> None:
    shop = await post_store(client)
    closed = await client.post(f"/api/stores/{shop['store_id']}/close", json={"reason": "flood"})
    assert closed.status_code == 200
    assert (closed.json()["open"], closed.json()["closed_reason"]) == (False, "flood")
    reopened = await client.post(f"/api/stores/{shop['store_id']}/reopen")
    assert reopened.status_code == 200
    assert (reopened.json()["open"], reopened.json()["closed_reason"]) == (True, None)


async def test_closing_a_closed_store_is_422_with_the_rule(client: httpx.AsyncClient) -> None:
    shop = await post_store(client)
    url = f"/api/stores/{shop['store_id']}/close"
    await client.post(url, json={"reason": "flood"})
    response = await client.post(url, json={"reason": "again"})
    assert response.status_code == 422
    assert response.json() == {
        "error": "business_rule_violation",
        "detail": f"store {shop['store_id']} is already closed",
    }


async def test_reopening_an_open_store_is_422(client: httpx.AsyncClient) -> None:
    shop = await post_store(client)
    response = await client.post(f"/api/stores/{shop['store_id']}/reopen")
    assert response.status_code == 422
    assert response.json()["detail"] == f"store {shop['store_id']} is already open"


async def test_closing_needs_a_reason_and_an_existing_store(client: httpx.AsyncClient) -> None:
    shop = await post_store(client)
    no_reason = await client.post(f"/api/stores/{shop['store_id']}/close", json={})
    assert no_reason.status_code == 422
    assert messages(no_reason) == [("reason", "Field required")]
    unknown = await client.post("/api/stores/nowhere/close", json={"reason": "flood"})
    assert unknown.status_code == 404


async def test_stores_are_paged_and_filtered_by_district(client: httpx.AsyncClient) -> None:
    created = [await post_store(client, name=f"Store {i}",
                                district="Laval" if i % 2 else "Montréal") for i in range(5)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/stores", params=params)).json()
        assert len(page["items"]) <= 2
        seen += [s["store_id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [s["store_id"] for s in created]  # creation order

    laval = (await client.get("/api/stores", params={"district": "Laval"})).json()
    assert [s["name"] for s in laval["items"]] == ["Store 1", "Store 3"]
    assert laval["next_cursor"] is None


async def test_a_page_size_out_of_bounds_is_422(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/stores", params={"limit": 0})).status_code == 422
    assert (await client.get("/api/products", params={"limit": 501})).status_code == 422


# -- catalog ----------------------------------------------------------------------------


async def test_adding_a_product_answers_201_with_its_location(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/products", json=PRODUCT)
    assert response.status_code == 201
    body = response.json()
    assert body == {"product_id": body["product_id"], **PRODUCT}
    assert response.headers["Location"] == f"/api/products/{body['product_id']}"
    assert (await client.get(response.headers["Location"])).json() == body


async def test_a_used_sku_is_409(client: httpx.AsyncClient) -> None:
    first = (await client.post("/api/products", json=PRODUCT)).json()
    response = await client.post("/api/products", json={**PRODUCT, "name": "Thé"})
    assert response.status_code == 409
    assert response.json() == {
        "error": "conflict",
        "detail": f"SKU 'SKU-1' is already used by product {first['product_id']}",
    }


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"unit_price": 0}, "unit_price", "Input should be greater than 0"),
        ({"unit_price": 4.99}, "unit_price", "Input should be a valid integer"),
        ({"unit_price": "499"}, "unit_price", "Input should be a valid integer"),
        ({"currency": "cad"}, "currency", "String should match pattern '^[A-Z]{3}$'"),
        ({"sku": "A B"}, "sku", "String should match pattern '^\\S+$'"),
        ({"name": ""}, "name", "String should have at least 1 character"),
    ],
)
async def test_an_invalid_product_is_422_with_the_field_at_fault(
    client: httpx.AsyncClient, changes: dict[str, Any], field: str, message: str
) -> None:
    response = await client.post("/api/products", json={**PRODUCT, **changes})
    assert response.status_code == 422
    assert messages(response) == [(field, message)]


async def test_a_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/products", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


async def test_changing_a_price(client: httpx.AsyncClient) -> None:
    product = (await client.post("/api/products", json=PRODUCT)).json()
    url = f"/api/products/{product['product_id']}/price"
    response = await client.put(url, json={"unit_price": 549, "currency": "CAD"})
    assert response.status_code == 200
    assert response.json() == {**product, "unit_price": 549}
    assert (await client.get(f"/api/products/{product['product_id']}")).json()["unit_price"] == 549
    bad = await client.put(url, json={"unit_price": -1, "currency": "CAD"})
    assert bad.status_code == 422
    assert messages(bad) == [("unit_price", "Input should be greater than 0")]


async def test_an_unknown_product_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/products/nope")).status_code == 404
    response = await client.put("/api/products/nope/price",
                                json={"unit_price": 100, "currency": "CAD"})
    assert response.status_code == 404
    assert response.json()["detail"] == "no product nope"


async def test_products_are_paged(client: httpx.AsyncClient) -> None:
    for i in range(3):
        await client.post("/api/products", json={**PRODUCT, "sku": f"SKU-{i}"})
    first = (await client.get("/api/products", params={"limit": 2})).json()
    assert [p["sku"] for p in first["items"]] == ["SKU-0", "SKU-1"]
    rest = (await client.get("/api/products",
                             params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [p["sku"] for p in rest["items"]] == ["SKU-2"]
    assert rest["next_cursor"] is None


# -- orders -----------------------------------------------------------------------------


async def reserve(store: SqliteEventStore, transaction_id: str, store_id: str) -> None:
    payload = InventoryReserved(transaction_id, f"r-{transaction_id}", store_id,
                                (StockLine("p1", 2),), "2030-01-01T00:00:00+00:00")
    [event] = await store.append(
        stream_id("reservation", f"r-{transaction_id}"),
        [NewEvent("InventoryReserved", SCHEMAS.dump(payload), correlation_id=transaction_id)],
    )
    await deliver(store, SCHEMAS, "store", handlers()["InventoryReserved"], event)


async def test_orders_are_listed_by_store_and_status(
    client: httpx.AsyncClient, store: SqliteEventStore
) -> None:
    a = await post_store(client, name="A")
    b = await post_store(client, name="B")
    await client.post(f"/api/stores/{b['store_id']}/close", json={"reason": "flood"})
    await reserve(store, "t1", a["store_id"])
    await reserve(store, "t2", b["store_id"])
    await reserve(store, "t3", a["store_id"])

    of_a = (await client.get("/api/orders", params={"store_id": a["store_id"]})).json()
    assert [o["transaction_id"] for o in of_a["items"]] == ["t1", "t3"]
    failed = (await client.get("/api/orders", params={"status": "FAILED"})).json()
    assert [(o["transaction_id"], o["reason"]) for o in failed["items"]] == [
        ("t2", "store_closed")
    ]
    order = (await client.get("/api/orders/t1")).json()
    assert order["status"] == "FULFILLED"
    assert order["order_id"]
    assert order["lines"] == [{"product_id": "p1", "quantity": 2}]


async def test_an_unknown_order_is_404_and_a_bad_status_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/orders/t404")
    assert response.status_code == 404
    assert response.json()["detail"] == "no order of transaction t404"
    assert (await client.get("/api/orders", params={"status": "LOST"})).status_code == 422
