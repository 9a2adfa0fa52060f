"""What the inventory does with each event it consumes; `handlers()` is the registry.

Every handler loads the reservation of the transaction and the stock items it touches,
changes them and stages them, with their documents, in the bus's unit of work. Two
handlers racing for the same stock item both expect the version they loaded: one commit
fails with ConcurrencyError and the dispatcher redoes that handler on fresh state, so stock
is never promised twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from magasin.eventstore.store import UnitOfWork
from magasin.inventory import readmodel
from magasin.inventory.domain import (
    Reservation,
    ReservationStatus,
    StockItem,
    merge_lines,
    release_reservation,
    reserve_all,
    stock_key,
)
from magasin.messaging.bus import Handler
from magasin.shared.clock import utcnow
from magasin.shared.commands import ReleaseStock, ReserveStock, orchestrated
from magasin.shared.errors import NotFound
from magasin.shared.events import (
    SCHEMAS,
    OrderFulfillmentFailed,
    PaymentProcessed,
    ProductAdded,
    SagaAborted,
    StockLine,
    StoreRegistered,
    TransactionCancelled,
    TransactionCompleted,
)
from magasin.shared.ids import time_ordered_id
from magasin.shared.messages import RecordedEvent

log = logging.getLogger("magasin.inventory")

Clock = Callable[[], datetime]


async def load_items(
    uow: UnitOfWork, store_id: str, product_ids: Iterable[str]
) -> dict[str, StockItem]:
    """The stock items of these products in this store, by product id; empty if never stocked."""
    items: dict[str, StockItem] = {}
    for product_id in product_ids:
        found = await readmodel.stock_items.find(uow, stock_key(store_id, product_id))
        items[product_id] = found or StockItem.create(store_id, product_id)
    return items


async def _held(uow: UnitOfWork, reservation: Reservation) -> dict[str, StockItem]:
    assert reservation.store_id is not None
    return await load_items(uow, reservation.store_id, (x.product_id for x in reservation.lines))


async def _reservation_for(uow: UnitOfWork, transaction_id: str, what: str) -> Reservation:
    """A compensation or completion needs the reservation; until it exists, retry later."""
    reservation = await readmodel.reservations.find(uow, transaction_id)
    if reservation is None:
        raise NotFound(f"{what} for transaction {transaction_id} before its reservation")
    return reservation


def handlers(ttl_s: float, clock: Clock = utcnow) -> dict[str, Handler]:
    """The inventory consumer's registry; reservations live `ttl_s` seconds unless fulfilled."""
    if ttl_s <= 0:
        raise ValueError("a reservation's time to live must be > 0 seconds")
    ttl = timedelta(seconds=ttl_s)

    async def reserve(
        uow: UnitOfWork, transaction_id: str, store_id: str, stock: Iterable[StockLine],
        payment_id: str = "",
    ) -> None:
        """Reserve a sale's stock once (choreography: PaymentProcessed, whose payment id
        InventoryReserved carries on; orchestration: ReserveStock); publishes
        InventoryReserved or InventoryUnavailable."""
        if await readmodel.reservations.find(uow, transaction_id, likely_new=True) is not None:
            return  # already reserved, refused, or voided by an earlier cancellation
        reservation = Reservation(transaction_id)
        lines = merge_lines(stock)
        items = await load_items(uow, store_id, (x.product_id for x in lines))
        missing = reserve_all(items, lines, transaction_id)
        if missing:
            reservation.refuse(store_id, missing)
        else:
            reservation.reserve(time_ordered_id(), store_id, lines, clock() + ttl, payment_id)
        readmodel.save(uow, items.values(), reservation)

    async def on_payment_processed(event: RecordedEvent, uow: UnitOfWork) -> None:
        if orchestrated(event):
            return  # the orchestrator sends ReserveStock for this sale
        paid: PaymentProcessed = SCHEMAS.validate(event)
        await reserve(uow, paid.transaction_id, paid.store_id, paid.lines, paid.payment_id)

    async def on_reserve_stock(event: RecordedEvent, uow: UnitOfWork) -> None:
        command: ReserveStock = SCHEMAS.validate(event)
        await reserve(uow, command.transaction_id, command.store_id,
                      (StockLine(x.product_id, x.quantity) for x in command.lines))

    async def on_release_stock(event: RecordedEvent, uow: UnitOfWork) -> None:
        command: ReleaseStock = SCHEMAS.validate(event)
        reservation = await _reservation_for(uow, command.transaction_id, "release")
        await _release(uow, reservation, release_reason(command.reason))

    async def on_order_fulfillment_failed(event: RecordedEvent, uow: UnitOfWork) -> None:
        if orchestrated(event):
            return  # the orchestrator sends ReleaseStock once the refund is confirmed
        failed: OrderFulfillmentFailed = SCHEMAS.validate(event)
        reservation = await _reservation_for(uow, failed.transaction_id, "fulfilment failed")
        await _release(uow, reservation, "fulfillment_failed")

    async def on_transaction_completed(event: RecordedEvent, uow: UnitOfWork) -> None:
        completed: TransactionCompleted = SCHEMAS.validate(event)
        reservation = await _reservation_for(
            uow, completed.transaction_id, "transaction completed"
        )
        if reservation.status is ReservationStatus.COMMITTED:
            return
        if reservation.status is not ReservationStatus.RESERVED:
            # Retrying cannot change this: say it loudly rather than dead-letter forever.
            log.error("transaction %s completed while its reservation is %s: nothing to commit",
                      completed.transaction_id, reservation.status)
            return
        # The units left `available` when they were reserved: no stock item changes.
        reservation.commit()
        readmodel.save(uow, (), reservation)

    async def on_transaction_cancelled(event: RecordedEvent, uow: UnitOfWork) -> None:
        cancelled: TransactionCancelled = SCHEMAS.validate(event)
        reservation = await readmodel.reservations.find(uow, cancelled.transaction_id)
        if reservation is None:
            reservation = Reservation(cancelled.transaction_id)
            reservation.void("transaction_cancelled")
            readmodel.save(uow, (), reservation)
            return
        await _release(uow, reservation, "transaction_cancelled")

    async def on_saga_aborted(event: RecordedEvent, uow: UnitOfWork) -> None:
        if orchestrated(event):
            return  # the orchestrator sends ReleaseStock (TransactionCancelled voids the rest)
        aborted: SagaAborted = SCHEMAS.validate(event)
        reservation = await readmodel.reservations.find(uow, aborted.transaction_id)
        if reservation is None:
            # Given up before any reservation: a late payment must reserve nothing.
            reservation = Reservation(aborted.transaction_id)
            reservation.void("saga_aborted")
            readmodel.save(uow, (), reservation)
            return
        # The transaction gave the sale up because the reservation's time was up.
        expired = aborted.reason == "reservation_expired"
        await _release(uow, reservation, "expired" if expired else "saga_aborted")

    async def on_product_added(event: RecordedEvent, uow: UnitOfWork) -> None:
        product: ProductAdded = SCHEMAS.validate(event)
        uow.put_document(
            readmodel.PRODUCTS,
            product.product_id,
            {"product_id": product.product_id, "sku": product.sku, "name": product.name},
        )

    async def on_store_registered(event: RecordedEvent, uow: UnitOfWork) -> None:
        store: StoreRegistered = SCHEMAS.validate(event)
        uow.put_document(
            readmodel.STORES, store.store_id, {"store_id": store.store_id, "name": store.name}
        )

    return {
        "PaymentProcessed": on_payment_processed,
        "ReserveStock": on_reserve_stock,
        "ReleaseStock": on_release_stock,
        "OrderFulfillmentFailed": on_order_fulfillment_failed,
        "TransactionCompleted": on_transaction_completed,
        "TransactionCancelled": on_transaction_cancelled,
        "SagaAborted": on_saga_aborted,
        "ProductAdded": on_product_added,
        "StoreRegistered": on_store_registered,
    }


def release_reason(saga_reason: str) -> str:
    """The release reason the choreographed reaction to the same failure would give."""
    if saga_reason.startswith("fulfillment_failed"):
        return "fulfillment_failed"
    if saga_reason.startswith("deadline") or saga_reason.startswith("forced"):
        return "saga_aborted"
    return "transaction_cancelled"


async def _release(uow: UnitOfWork, reservation: Reservation, reason: str) -> None:
    """Give back a held reservation; one already released, refused or ended is left as is."""
    if reservation.status is not ReservationStatus.RESERVED:
        return
    items = await _held(uow, reservation)
    release_reservation(reservation, items, reason)
    readmodel.save(uow, items.values(), reservation)
