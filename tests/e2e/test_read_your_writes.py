"""Reading one's own writes on the embedded deployment (seed 6.2.2): the `Location` of a
`201` answers `200` at once, however far the read models lag behind the log."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.e2e.conftest import Shop

SALES = 200


async def created_then_read(shop: Shop, url: str, body: dict[str, object]) -> int:
    """POST `body`, then at once GET the `Location` answered; the GET's status."""
    created = await shop.client.post(url, json=body)
    assert created.status_code == 201, created.text
    read = await shop.client.get(created.headers["Location"])
    if read.status_code == 200:
        assert read.json() == created.json() | read.json()  # the same thing, maybe further on
    return read.status_code


async def test_every_sale_created_is_read_at_once_from_its_location(shop: Shop) -> None:
    store = await shop.open_store()
    coffee = await shop.add_product("CAF", 1899)
    await shop.restock(store, coffee, SALES)
    await shop.sell(store, [(coffee, 1)])  # the catalog replica knows store and product now
    body = {"store_id": store, "customer_id": "alice", "payment_method": "VISA",
            "items": [{"product_id": coffee, "quantity": 1}]}
    statuses = await asyncio.gather(
        *(created_then_read(shop, "/api/transactions", body) for _ in range(SALES)))
    assert Counter(statuses) == {200: SALES}


async def test_every_store_and_product_created_is_read_at_once_from_its_location(
    shop: Shop,
) -> None:
    stores = [created_then_read(shop, "/api/stores",
                                {"name": f"S{n}", "district": "Plateau", "address": "2 rue Y"})
              for n in range(SALES // 2)]
    products = [created_then_read(shop, "/api/products", {
        "sku": f"SKU-{n}", "name": f"P{n}", "unit_price": 100 + n, "currency": "CAD"})
        for n in range(SALES // 2)]
    statuses = await asyncio.gather(*stores, *products)
    assert Counter(statuses) == {200: SALES}
