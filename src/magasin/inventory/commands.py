"""Commands the inventory runs on its own: restocking, and the sweep of expired reservations."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from magasin.eventstore.store import Causation, EventStore
from magasin.inventory import readmodel
from magasin.inventory.domain import StockItem, stock_key
from magasin.inventory.handlers import Clock
from magasin.inventory.projection import stock_projection
from magasin.projections import catch_up
from magasin.shared.clock import utcnow
from magasin.shared.errors import ConcurrencyError, InvalidInput, MagasinError, NotFound

log = logging.getLogger("magasin.inventory")

ATTEMPTS = 10
"""Tries of a command that keeps losing version races before it gives up."""
SWEEP_PAGE = 200


async def restock(
    store: EventStore, store_id: str, product_id: str, quantity: int, reason: str = "restock"
) -> dict[str, Any]:
    """Add `quantity` units of a known product to a known store; returns the stock line.

    Raises InvalidInput (quantity <= 0, empty reason), NotFound (store or product unknown
    to the inventory's replicas of the store service's events).
    """
    if quantity <= 0:
        raise InvalidInput(f"restock quantity must be > 0, got {quantity}")
    if not reason.strip():
        raise InvalidInput("a restock needs a reason")
    if await store.get_document(readmodel.STORES, store_id) is None:
        raise NotFound(f"no store {store_id}")
    if await store.get_document(readmodel.PRODUCTS, product_id) is None:
        raise NotFound(f"no product {product_id}")
    causation = Causation(metadata={"service": "inventory", "actor": "restock"})
    key = stock_key(store_id, product_id)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with store.transaction(causation) as uow:
                item = await readmodel.stock_items.find(uow, key)
                item = item or StockItem.create(store_id, product_id)
                item.add(quantity, reason)
                readmodel.save(uow, (item,))
            break
        except ConcurrencyError:
            # A reservation moved this item meanwhile: add on top of the fresh state.
            if attempt == ATTEMPTS:
                raise
    # The stock item knows what is available, not how much of what it let go was sold
    # (the reservations' commits say that): answer with the read model, brought up to
    # this restock at least.
    await catch_up(store, stock_projection(), until=uow.recorded[-1].global_position)
    line = await store.get_document(readmodel.STOCK, key)
    assert line is not None
    return line


async def expire_reservations(store: EventStore, now: datetime) -> int:
    """Report every held, unfulfilled reservation whose expiry is at or before `now`
    (ReservationExpired): the transaction then gives its sale up and the release follows,
    unless the sale's order was recorded first (see docs/architecture.md, late fulfilment).

    Each one is reported in its own unit of work, correlated with its transaction, so one
    that fails (it is retried at the next sweep) does not hold the others. Returns how many
    were reported.
    """
    released = 0
    after: str | None = None
    while True:
        rows = await store.find_documents(
            readmodel.RESERVATIONS,
            where={"status": "RESERVED", "fulfilled": False},
            after_key=after,
            limit=SWEEP_PAGE,
        )
        for transaction_id, doc in rows:
            expires_at = doc.get("expires_at")
            if doc.get("expired_at"):
                continue  # reported already: its release follows the transaction's decision
            if expires_at is not None and datetime.fromisoformat(expires_at) <= now:
                try:
                    released += await _expire(store, transaction_id, now)
                except MagasinError as exc:
                    log.warning("could not expire the reservation of %s: %r", transaction_id, exc)
        if len(rows) < SWEEP_PAGE:
            return released
        after = rows[-1][0]


async def _expire(store: EventStore, transaction_id: str, now: datetime) -> int:
    causation = Causation(
        correlation_id=transaction_id, metadata={"service": "inventory", "actor": "expiry"}
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with store.transaction(causation) as uow:
                reservation = await readmodel.reservations.find(uow, transaction_id)
                if reservation is None or not reservation.is_expired(now):
                    return 0  # fulfilled, released, committed or reported since the listing
                reservation.expire(now)
                readmodel.save(uow, (), reservation)
            return 1
        except ConcurrencyError:
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def expiry_loop(
    store: EventStore, every_s: float, clock: Clock = utcnow
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background loop (for `Service.loops`) sweeping expired reservations every `every_s`."""

    async def loop() -> None:
        while True:
            try:
                count = await expire_reservations(store, clock())
                if count:
                    log.info("reported %d expired reservation(s)", count)
            except Exception:
                # A broken sweep must not stop the next one (the database may come back).
                log.exception("expired reservations sweep failed")
            await asyncio.sleep(every_s)

    return loop
