"""Read-model documents of the store service, staged in the unit of work of each change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from magasin.eventstore.store import UnitOfWork
from magasin.shared.clock import utcnow
from magasin.shared.events import StockLine
from magasin.stores.domain import Order, Product, Store

STORES = "store.stores"
PRODUCTS = "store.products"
SKUS = "store.skus"
ORDERS = "store.orders"


def put_store(uow: UnitOfWork, store: Store) -> dict[str, Any]:
    doc = {
        "store_id": store.id, "name": store.name, "district": store.district,
        "address": store.address, "open": store.open, "closed_reason": store.closed_reason,
    }
    uow.put_document(STORES, store.id, doc)
    return doc


def put_product(uow: UnitOfWork, product: Product) -> dict[str, Any]:
    doc = {
        "product_id": product.id, "sku": product.sku, "name": product.name,
        "unit_price": product.unit_price, "currency": product.currency,
    }
    uow.put_document(PRODUCTS, product.id, doc)
    return doc


def put_sku(uow: UnitOfWork, product: Product) -> None:
    uow.put_document(SKUS, product.sku, {"sku": product.sku, "product_id": product.id})


def put_order(uow: UnitOfWork, order: Order, lines: Sequence[StockLine]) -> dict[str, Any]:
    assert order.status is not None, "only a prepared order has a document"
    doc = {
        "order_id": order.order_id, "transaction_id": order.id, "store_id": order.store_id,
        "status": order.status.value, "reason": order.reason,
        "lines": [{"product_id": li.product_id, "quantity": li.quantity} for li in lines],
        "updated_at": utcnow().isoformat(),
    }
    uow.put_document(ORDERS, order.id, doc)
    return doc
