"""Documents of the store service: the read models are projections (projection.py); the
SKU index is write-side state, written with the SKU claim it mirrors."""

from __future__ import annotations

from typing import Any

from magasin.eventstore.store import UnitOfWork
from magasin.stores.domain import Product, Store
from magasin.stores.projection import ORDERS, PRODUCTS, STORES

SKUS = "store.skus"

__all__ = ["ORDERS", "PRODUCTS", "SKUS", "STORES", "product_document", "put_sku",
           "store_document"]


def store_document(store: Store) -> dict[str, Any]:
    """The read-model document of `store` (what its projection writes), from the aggregate
    (saved or rebuilt: its `version` is that of its last event)."""
    return {
        "store_id": store.id, "name": store.name, "district": store.district,
        "address": store.address, "open": store.open, "closed_reason": store.closed_reason,
        "version": store.version,
    }


def product_document(product: Product) -> dict[str, Any]:
    return {
        "product_id": product.id, "sku": product.sku, "name": product.name,
        "unit_price": product.unit_price, "currency": product.currency,
        "version": product.version,
    }


def put_sku(uow: UnitOfWork, product: Product) -> None:
    uow.put_document(SKUS, product.sku, {"sku": product.sku, "product_id": product.id})
