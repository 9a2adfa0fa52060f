"""The transaction read model (CQRS query side), written with each change of the aggregate."""

from __future__ import annotations

from typing import Any

from magasin.eventstore.store import UnitOfWork
from magasin.shared.clock import utcnow
from magasin.transactions.domain import Transaction
from magasin.transactions.feed import StatusFeed

TRANSACTIONS = "transaction.transactions"
PRODUCTS = "transaction.products"
STORES = "transaction.stores"


async def project(
    uow: UnitOfWork, sale: Transaction, feed: StatusFeed | None = None
) -> dict[str, Any]:
    """Stage the read-model document of `sale`, appending to its status history on change;
    once committed, `feed` wakes whoever follows the sale."""
    now = utcnow().isoformat()
    doc = await uow.get_document(TRANSACTIONS, sale.id) or {"created_at": now, "history": []}
    status = sale.status.value
    history: list[dict[str, Any]] = doc["history"]
    for passed in sale.passed:
        if not history or history[-1]["status"] != passed.value:
            history.append({"status": passed.value, "at": now, "version": sale.version})
    sale.passed.clear()
    doc.update(
        transaction_id=sale.id,
        store_id=sale.store_id,
        customer_id=sale.customer_id,
        lines=[
            {"product_id": li.product_id, "quantity": li.quantity, "unit_price": li.unit_price}
            for li in sale.lines
        ],
        total=sale.total,
        currency=sale.currency,
        payment_method=sale.payment_method,
        callback_url=sale.callback_url,
        status=status,
        reason=sale.failure,
        payment_id=sale.payment_id,
        reservation_id=sale.reservation_id,
        order_id=sale.order_id,
        version=sale.version,
        updated_at=now,
        history=history,
    )
    uow.put_document(TRANSACTIONS, sale.id, doc)
    if feed is not None:
        uow.after_commit(lambda: feed.changed(sale.id))
    return doc
