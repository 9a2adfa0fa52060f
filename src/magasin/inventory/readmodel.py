"""The inventory's read models and the one way its aggregates are saved with them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.inventory.domain import Reservation, StockItem
from magasin.inventory.projection import RESERVATIONS, STOCK, empty_line

__all__ = ["PRODUCTS", "RESERVATIONS", "STOCK", "STORES", "reservations", "save", "stock_items"]

# The read models are projections (projection.py); the replicas below are write-side
# state: restocking checks them, so a bus consumer keeps them with its inbox.
PRODUCTS = "inventory.products"
"""Replica of the catalog, key product_id, so restocking refuses unknown products."""
STORES = "inventory.stores"
"""Replica of the stores, key store_id, so restocking refuses unknown stores."""

stock_items: Repository[StockItem] = Repository(StockItem)
reservations: Repository[Reservation] = Repository(Reservation)


def reservation_document(reservation: Reservation) -> dict[str, Any]:
    return {
        "reservation_id": reservation.reservation_id,
        "transaction_id": reservation.transaction_id,
        "store_id": reservation.store_id,
        "lines": [{"product_id": x.product_id, "quantity": x.quantity} for x in reservation.lines],
        "status": reservation.status.value if reservation.status else None,
        "expires_at": reservation.expires_at.isoformat() if reservation.expires_at else None,
        "fulfilled": reservation.fulfilled,
        "missing": [
            {"product_id": m.product_id, "requested": m.requested, "available": m.available}
            for m in reservation.missing
        ],
        "reason": reservation.reason,
    }


def empty_stock_document(store_id: str, product_id: str) -> dict[str, Any]:
    return empty_line(store_id, product_id)


def save(
    uow: UnitOfWork, items: Iterable[StockItem], reservation: Reservation | None = None
) -> None:
    """Stage the changes of these aggregates in one unit of work (their documents follow
    through the projections).

    Stock items are appended in key order so that concurrent writers on a database that
    locks per row (PostgreSQL) take their locks in the same order.
    """
    for item in sorted(items, key=lambda i: i.id):
        if item.pending:
            stock_items.save(uow, item)
    if reservation is not None and reservation.pending:
        reservations.save(uow, reservation)
