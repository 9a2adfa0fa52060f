"""The store service's read models as projections: stores, products and orders.

Store and product documents carry the `version` of their stream they reflect, so that a
read can tell a document behind its stream (see api.py: such a read replays instead)."""

from __future__ import annotations

from magasin.projections import Projection, ProjectionUnit
from magasin.shared.messages import RecordedEvent

STORES = "store.stores"
PRODUCTS = "store.products"
ORDERS = "store.orders"


async def _store_changed(event: RecordedEvent, unit: ProjectionUnit) -> None:
    p = event.payload
    if event.type == "StoreRegistered":
        unit.put_document(STORES, p["store_id"], {
            "store_id": p["store_id"], "name": p["name"], "district": p["district"],
            "address": p["address"], "open": True, "closed_reason": None,
            "version": event.stream_version,
        })
        return
    doc = await unit.get_document(STORES, p["store_id"])
    if doc is None:
        return  # registered first in the same stream: cannot happen in one log
    closed = event.type == "StoreClosed"
    doc.update(open=not closed, closed_reason=p["reason"] if closed else None,
               version=event.stream_version)
    unit.put_document(STORES, p["store_id"], doc)


async def _product_changed(event: RecordedEvent, unit: ProjectionUnit) -> None:
    p = event.payload
    if event.type == "ProductAdded":
        unit.put_document(PRODUCTS, p["product_id"], {
            "product_id": p["product_id"], "sku": p["sku"], "name": p["name"],
            "unit_price": p["unit_price"], "currency": p["currency"],
            "version": event.stream_version,
        })
        return
    doc = await unit.get_document(PRODUCTS, p["product_id"])
    if doc is not None:
        doc.update(unit_price=p["unit_price"], currency=p["currency"],
                   version=event.stream_version)
        unit.put_document(PRODUCTS, p["product_id"], doc)


async def _order_prepared(event: RecordedEvent, unit: ProjectionUnit) -> None:
    p = event.payload
    before = await unit.get_document(ORDERS, p["transaction_id"])
    if before is not None and before.get("version", 0) >= event.stream_version:
        return  # applied already (inline, by the unit of work that appended it)
    fulfilled = event.type == "OrderFulfilled"
    unit.put_document(ORDERS, p["transaction_id"], {
        "order_id": p.get("order_id") or None, "transaction_id": p["transaction_id"],
        "store_id": p["store_id"], "status": "FULFILLED" if fulfilled else "FAILED",
        "reason": None if fulfilled else p["reason"],
        "lines": [{"product_id": x["product_id"], "quantity": x["quantity"]}
                  for x in p.get("lines", ())],
        "updated_at": event.occurred_at.isoformat(), "version": event.stream_version,
    })


def stores_projection() -> Projection:
    kinds = ("StoreRegistered", "StoreClosed", "StoreReopened")
    return Projection("store.stores", dict.fromkeys(kinds, _store_changed), (STORES,))


def products_projection() -> Projection:
    kinds = ("ProductAdded", "ProductPriceChanged")
    return Projection("store.products", dict.fromkeys(kinds, _product_changed), (PRODUCTS,))


def orders_projection() -> Projection:
    """Inline: one document per order stream (the transaction id), with its version."""
    kinds = ("OrderFulfilled", "OrderFulfillmentFailed")
    return Projection("store.orders", dict.fromkeys(kinds, _order_prepared), (ORDERS,),
                      inline=True)
