"""Which aggregate class rebuilds the streams of each aggregate type, for replays."""

from __future__ import annotations

from functools import cache
from typing import Any

from magasin.eventstore.repository import Repository
from magasin.shared.errors import NotFound


@cache
def repositories() -> dict[str, Repository[Any]]:
    """Aggregate type (the stream id's prefix) -> repository of its class."""
    from magasin.inventory.domain import Reservation, StockItem
    from magasin.payments.domain import Payment
    from magasin.stores.domain import Order, Product, Sku, Store
    from magasin.transactions.domain import Transaction

    classes = (Transaction, Payment, StockItem, Reservation, Store, Product, Order, Sku)
    return {cls.stream_type: Repository(cls) for cls in classes}


def repository(aggregate_type: str) -> Repository[Any]:
    found = repositories().get(aggregate_type)
    if found is None:
        raise NotFound(
            f"no aggregate type {aggregate_type!r}; known: {', '.join(sorted(repositories()))}"
        )
    return found
