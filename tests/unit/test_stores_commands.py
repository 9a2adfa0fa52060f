"""Commands of the store service: what the API and the demo seeder change, atomically."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore, Operation
from magasin.shared.errors import (
    BusinessRuleViolation,
    ConcurrencyError,
    Conflict,
    InvalidInput,
    NotFound,
)
from magasin.shared.messages import RecordedEvent
from magasin.stores import commands, readmodel
from tests.unit.conftest import project_all


async def projected(store: EventStore, collection: str, key: str) -> dict[str, Any] | None:
    """The read-model document once the projections have caught up with the commands."""
    await project_all(store)
    return await store.get_document(collection, key)


async def projected_all(store: EventStore, collection: str) -> list[tuple[str, dict[str, Any]]]:
    await project_all(store)
    return await store.find_documents(collection)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with SqliteEventStore(tmp_path / "commands.db") as s:
        yield s


async def test_registering_a_store_records_it_and_its_document(store: EventStore) -> None:
    doc = await commands.register_store(store, " Plateau ", "Montréal", "1 rue A")
    assert doc == {
        "store_id": doc["store_id"], "name": "Plateau", "district": "Montréal",
        "address": "1 rue A", "open": True, "closed_reason": None, "version": 1,
    }
    assert await projected(store, readmodel.STORES, doc["store_id"]) == doc
    [event] = await store.read_stream(f"store-{doc['store_id']}")
    assert event.type == "StoreRegistered"
    assert event.metadata == {"service": "store"}


async def test_a_store_id_chosen_twice_conflicts(store: EventStore) -> None:
    await commands.register_store(store, "Plateau", "Montréal", "1 rue A", store_id="mtl-1")
    with pytest.raises(Conflict, match="store mtl-1 already exists"):
        await commands.register_store(store, "Other", "Laval", "2 rue B", store_id="mtl-1")
    doc = await projected(store, readmodel.STORES, "mtl-1")
    assert doc is not None
    assert doc["name"] == "Plateau"


async def test_closing_and_reopening_updates_the_document(store: EventStore) -> None:
    shop = await commands.register_store(store, "Plateau", "Montréal", "1 rue A")
    closed = await commands.close_store(store, shop["store_id"], "flood")
    assert (closed["open"], closed["closed_reason"]) == (False, "flood")
    reopened = await commands.reopen_store(store, shop["store_id"])
    assert (reopened["open"], reopened["closed_reason"]) == (True, None)
    assert await projected(store, readmodel.STORES, shop["store_id"]) == reopened


async def test_closing_an_unknown_store_is_not_found(store: EventStore) -> None:
    with pytest.raises(NotFound, match="no store nowhere"):
        await commands.close_store(store, "nowhere", "flood")


async def test_closing_twice_at_once_closes_once(store: EventStore) -> None:
    shop = await commands.register_store(store, "Plateau", "Montréal", "1 rue A")
    results = await asyncio.gather(
        commands.close_store(store, shop["store_id"], "flood"),
        commands.close_store(store, shop["store_id"], "fire"),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1
    assert isinstance(refused[0], BusinessRuleViolation)
    assert len(await store.read_stream(f"store-{shop['store_id']}")) == 2


async def test_adding_a_product_indexes_its_sku(store: EventStore) -> None:
    doc = await commands.add_product(store, "SKU-1", "Café", 499, "CAD")
    assert doc == {"product_id": doc["product_id"], "sku": "SKU-1", "name": "Café",
                   "unit_price": 499, "currency": "CAD", "version": 1}
    assert await projected(store, readmodel.PRODUCTS, doc["product_id"]) == doc
    assert await store.get_document(readmodel.SKUS, "SKU-1") == {
        "sku": "SKU-1", "product_id": doc["product_id"]
    }


async def test_a_used_sku_conflicts_and_writes_nothing(store: EventStore) -> None:
    first = await commands.add_product(store, "SKU-1", "Café", 499, "CAD")
    position = await store.last_position()
    used = f"SKU 'SKU-1' is already used by product {first['product_id']}"
    with pytest.raises(Conflict, match=used):
        await commands.add_product(store, " SKU-1 ", "Thé", 399, "CAD")
    assert await store.last_position() == position
    assert len(await projected_all(store, readmodel.PRODUCTS)) == 1


async def test_concurrent_adds_of_one_sku_let_exactly_one_win(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clashes = 0
    commit = store.commit

    async def counting_commit(operations: Sequence[Operation]) -> list[RecordedEvent]:
        nonlocal clashes
        try:
            return await commit(operations)
        except ConcurrencyError:
            clashes += 1
            raise

    monkeypatch.setattr(store, "commit", counting_commit)
    results = await asyncio.gather(
        *(commands.add_product(store, "SKU-1", f"Café {i}", 499, "CAD") for i in range(8)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1
    assert len(lost) == 7
    assert all(isinstance(e, Conflict) and "SKU 'SKU-1' is already used" in str(e) for e in lost)
    products = await projected_all(store, readmodel.PRODUCTS)
    assert [body for _, body in products] == won
    index = await store.get_document(readmodel.SKUS, "SKU-1")
    assert index is not None
    assert index["product_id"] == won[0]["product_id"]
    assert clashes > 0, "the adds did not race: the test proves nothing"


async def test_concurrent_adds_of_different_skus_all_succeed(store: EventStore) -> None:
    results = await asyncio.gather(
        *(commands.add_product(store, f"SKU-{i}", "Café", 499, "CAD") for i in range(8))
    )
    assert len({r["product_id"] for r in results}) == 8
    assert len(await store.find_documents(readmodel.SKUS)) == 8


async def test_a_product_id_chosen_twice_conflicts(store: EventStore) -> None:
    await commands.add_product(store, "SKU-1", "Café", 499, "CAD", product_id="cafe")
    with pytest.raises(Conflict, match="product cafe already exists"):
        await commands.add_product(store, "SKU-2", "Thé", 399, "CAD", product_id="cafe")
    assert await store.get_document(readmodel.SKUS, "SKU-2") is None


async def test_an_invalid_product_is_refused_before_anything_is_written(
    store: EventStore,
) -> None:
    with pytest.raises(InvalidInput, match="currency must be 3 upper-case letters"):
        await commands.add_product(store, "SKU-1", "Café", 499, "cad")
    assert await store.last_position() == 0


async def test_changing_a_price_updates_the_catalog(store: EventStore) -> None:
    product = await commands.add_product(store, "SKU-1", "Café", 499, "CAD")
    changed = await commands.change_price(store, product["product_id"], 549, "CAD")
    assert changed["unit_price"] == 549
    assert await projected(store, readmodel.PRODUCTS, product["product_id"]) == changed
    types = [e.type for e in await store.read_stream(f"product-{product['product_id']}")]
    assert types == ["ProductAdded", "ProductPriceChanged"]


async def test_setting_the_same_price_again_records_nothing(store: EventStore) -> None:
    product = await commands.add_product(store, "SKU-1", "Café", 499, "CAD")
    await commands.change_price(store, product["product_id"], 499, "CAD")
    assert len(await store.read_stream(f"product-{product['product_id']}")) == 1


async def test_changing_the_price_of_an_unknown_product_is_not_found(store: EventStore) -> None:
    with pytest.raises(NotFound, match="no product nope"):
        await commands.change_price(store, "nope", 100, "CAD")
