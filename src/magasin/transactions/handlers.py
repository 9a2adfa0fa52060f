"""Handlers of the transaction service: the saga, the catalog replica and the webhooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.shared.errors import NotFound
from magasin.shared.events import (
    SCHEMAS,
    InventoryReleased,
    ProductAdded,
    ProductPriceChanged,
    StoreRegistered,
)
from magasin.shared.messages import RecordedEvent
from magasin.transactions import readmodel, saga_index
from magasin.transactions.deadlines import Deadlines
from magasin.transactions.domain import Transaction

sales = Repository(Transaction)


def _saga_step(step: Callable[[Transaction, Any], None], deadlines: Deadlines) -> Handler:
    """A handler that loads the sale the event is about, applies `step` and saves it with
    its saga index (the `transaction.transactions` projection then turns the new events
    into the read model)."""

    async def handle(event: RecordedEvent, uow: UnitOfWork) -> None:
        payload = SCHEMAS.validate(event)
        sale = await sales.find(uow, payload.transaction_id)
        if sale is None:
            # Our own TransactionCreated commits before anyone can react to it, so this is
            # a message for a sale this service never had: retry, then dead-letter.
            raise NotFound(f"no transaction {payload.transaction_id}")
        step(sale, payload)
        await saga_index.save(uow, sale, deadlines)

    return handle


def _released(sale: Transaction, e: InventoryReleased) -> None:
    sale.inventory_released()
    if e.reason == "expired":
        # Logs written before ReservationExpired existed: the release came first.
        sale.reservation_expired()


def _registry(
    steps: dict[str, Callable[[Transaction, Any], None]], deadlines: Deadlines
) -> dict[str, Handler]:
    return {name: _saga_step(step, deadlines) for name, step in steps.items()}


def saga_handlers(deadlines: Deadlines = saga_index.DEFAULT_DEADLINES) -> dict[str, Handler]:
    """Consumer `transaction`: what the other services report that ends a sale, or starts or
    confirms its compensation. Of the happy path it hears only OrderFulfilled, which names
    the payment and the reservation before it (seed 6.1.1)."""
    steps: dict[str, Callable[[Transaction, Any], None]] = {
        "PaymentFailed": lambda s, e: s.payment_failed(e.reason),
        "InventoryUnavailable": lambda s, e: s.inventory_unavailable(),
        "InventoryReleased": _released,
        "ReservationVoided": lambda s, e: s.nothing_reserved(),
        "ReservationExpired": lambda s, e: s.reservation_expired(),
        "OrderFulfilled": lambda s, e: s.order_fulfilled(
            e.order_id, e.payment_id, e.reservation_id),
        "OrderFulfillmentFailed": lambda s, e: s.fulfillment_failed(e.reason),
        "PaymentRefunded": lambda s, e: s.payment_refunded(e.amount),
    }
    return _registry(steps, deadlines)


def step_handlers(deadlines: Deadlines = saga_index.DEFAULT_DEADLINES) -> dict[str, Handler]:
    """Consumer `transaction.steps`, for orchestrated sales only (it requires their routing
    tag): each step as the orchestrator's replies report it, so that such a sale shows
    PAYMENT_PROCESSED and INVENTORY_RESERVED as they happen and has a deadline per step."""
    steps: dict[str, Callable[[Transaction, Any], None]] = {
        "PaymentProcessed": lambda s, e: s.payment_captured(e.payment_id, e.amount),
        "InventoryReserved": lambda s, e: s.inventory_reserved(e.reservation_id),
    }
    return _registry(steps, deadlines)


# -- catalog replica: prices come from the catalog, which the store service owns ---------


async def _newer(uow: UnitOfWork, collection: str, key: str, event: RecordedEvent) -> bool:
    """Replica documents keep the stream version they reflect: older news is ignored."""
    doc = await uow.get_document(collection, key)
    return doc is None or doc["version"] < event.stream_version


async def on_product_added(event: RecordedEvent, uow: UnitOfWork) -> None:
    p: ProductAdded = SCHEMAS.validate(event)
    if await _newer(uow, readmodel.PRODUCTS, p.product_id, event):
        uow.put_document(readmodel.PRODUCTS, p.product_id, {
            "product_id": p.product_id, "name": p.name, "unit_price": p.unit_price,
            "currency": p.currency, "version": event.stream_version,
        })


async def on_price_changed(event: RecordedEvent, uow: UnitOfWork) -> None:
    p: ProductPriceChanged = SCHEMAS.validate(event)
    doc = await uow.get_document(readmodel.PRODUCTS, p.product_id)
    if doc is None:
        raise NotFound(f"price change for product {p.product_id} before it was added")
    if doc["version"] < event.stream_version:
        doc.update(unit_price=p.unit_price, currency=p.currency, version=event.stream_version)
        uow.put_document(readmodel.PRODUCTS, p.product_id, doc)


async def on_store_registered(event: RecordedEvent, uow: UnitOfWork) -> None:
    s: StoreRegistered = SCHEMAS.validate(event)
    if await _newer(uow, readmodel.STORES, s.store_id, event):
        uow.put_document(readmodel.STORES, s.store_id, {
            "store_id": s.store_id, "name": s.name, "version": event.stream_version,
        })


def catalog_handlers() -> dict[str, Handler]:
    """Consumer `transaction.catalog`: the local copy of stores and prices."""
    return {
        "ProductAdded": on_product_added,
        "ProductPriceChanged": on_price_changed,
        "StoreRegistered": on_store_registered,
    }


# -- client notification: a webhook on the terminal state, retried by the bus ------------


def notifier_handlers(client: httpx.AsyncClient) -> dict[str, Handler]:
    """Consumer `transaction.notifier`: POSTs the final state to the sale's callback_url.
    A failing endpoint raises, so the bus retries with backoff and finally dead-letters;
    the saga never waits for it. It requires the routing tag `notify=webhook`
    (`transactions.tags`): the final events of sales without a callback never reach it."""

    async def notify(event: RecordedEvent, uow: UnitOfWork) -> None:
        # From the aggregate, not the read model: the projection may not have caught up.
        sale = await sales.find(uow, event.payload["transaction_id"])
        if sale is None or not sale.callback_url:
            return
        body: dict[str, Any] = {
            "transaction_id": sale.id, "store_id": sale.store_id,
            "customer_id": sale.customer_id, "total": sale.total, "currency": sale.currency,
            "reason": sale.failure,
        }
        body["status"] = "COMPLETED" if event.type == "TransactionCompleted" else "CANCELLED"
        response = await client.post(
            sale.callback_url, json=body,
            headers={"Idempotency-Key": event.event_id, "X-Magasin-Event": event.type},
        )
        response.raise_for_status()

    return {"TransactionCompleted": notify, "TransactionCancelled": notify}

