"""Commands of the store service, shared by its HTTP API and the demo seeder.

Each runs in one unit of work (its events, and the SKU index) and is retried from a fresh
read when another writer moved one of its streams meanwhile. Each returns the read-model
document its projection will write, built from the aggregate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import Causation, EventStore, UnitOfWork
from magasin.shared.errors import ConcurrencyError, Conflict
from magasin.shared.ids import time_ordered_id
from magasin.stores import readmodel
from magasin.stores.domain import Product, Sku, Store

stores = Repository(Store)
products = Repository(Product)
skus = Repository(Sku)

CONFLICT_RETRIES = 5
_CAUSATION = Causation(metadata={"service": "store"})

T = TypeVar("T")


async def _run(store: EventStore, command: Callable[[UnitOfWork], Awaitable[T]]) -> T:
    for attempt in range(1, CONFLICT_RETRIES + 1):
        try:
            async with store.transaction(_CAUSATION) as uow:
                result = await command(uow)
            return result
        except ConcurrencyError:
            # A concurrent change committed first: redo against it, so the caller gets the
            # rule that now applies (already closed, SKU taken) rather than a version clash.
            if attempt == CONFLICT_RETRIES:
                raise
    raise AssertionError("unreachable")


async def register_store(
    store: EventStore, name: str, district: str, address: str, store_id: str | None = None
) -> dict[str, Any]:
    """Register an open store; Conflict if `store_id` is taken."""
    ident = store_id or time_ordered_id()

    async def run(uow: UnitOfWork) -> dict[str, Any]:
        # Built afresh on each attempt: saving an aggregate consumes its pending events.
        new = Store.register(ident, name=name, district=district, address=address)
        if await stores.find(uow, new.id) is not None:
            raise Conflict(f"store {new.id} already exists")
        stores.save(uow, new)
        return readmodel.store_document(new)

    return await _run(store, run)


async def close_store(store: EventStore, store_id: str, reason: str) -> dict[str, Any]:
    """Close a store (it then fails the orders it receives); NotFound, or
    BusinessRuleViolation if it is closed already."""

    async def run(uow: UnitOfWork) -> dict[str, Any]:
        shop = await stores.get(uow, store_id)
        shop.close(reason)
        stores.save(uow, shop)
        return readmodel.store_document(shop)

    return await _run(store, run)


async def reopen_store(store: EventStore, store_id: str) -> dict[str, Any]:
    """Reopen a closed store; NotFound, or BusinessRuleViolation if it is open."""

    async def run(uow: UnitOfWork) -> dict[str, Any]:
        shop = await stores.get(uow, store_id)
        shop.reopen()
        stores.save(uow, shop)
        return readmodel.store_document(shop)

    return await _run(store, run)


async def add_product(
    store: EventStore,
    sku: str,
    name: str,
    unit_price: int,
    currency: str,
    product_id: str | None = None,
) -> dict[str, Any]:
    """Add a product to the catalog; Conflict if its SKU or `product_id` is taken."""
    ident = product_id or time_ordered_id()

    async def run(uow: UnitOfWork) -> dict[str, Any]:
        new = Product.add(ident, sku=sku, name=name, unit_price=unit_price, currency=currency)
        claim = await skus.find(uow, new.sku)
        if claim is not None:
            raise Conflict(f"SKU {new.sku!r} is already used by product {claim.product_id}")
        if await products.find(uow, new.id) is not None:
            raise Conflict(f"product {new.id} already exists")
        # The claim's stream must not exist at commit: of two concurrent adds of one SKU,
        # the second fails there and, on retry, sees the first one's claim.
        skus.save(uow, Sku.claim(new.sku, new.id))
        products.save(uow, new)
        readmodel.put_sku(uow, new)
        return readmodel.product_document(new)

    return await _run(store, run)


async def change_price(
    store: EventStore, product_id: str, unit_price: int, currency: str
) -> dict[str, Any]:
    """Set a product's price (the same price again changes nothing); NotFound."""

    async def run(uow: UnitOfWork) -> dict[str, Any]:
        product = await products.get(uow, product_id)
        product.change_price(unit_price, currency)
        products.save(uow, product)
        return readmodel.product_document(product)

    return await _run(store, run)
