"""Handlers of the store service: preparing the order of a sale whose stock is reserved."""

from __future__ import annotations

from collections.abc import Sequence

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.shared.commands import PrepareOrder, orchestrated
from magasin.shared.events import SCHEMAS, InventoryReserved, StockLine
from magasin.shared.ids import time_ordered_id
from magasin.shared.messages import RecordedEvent
from magasin.stores.domain import Order, Store

orders = Repository(Order)
stores = Repository(Store)


async def prepare(
    uow: UnitOfWork, transaction_id: str, store_id: str, lines: Sequence[StockLine],
    payment_id: str = "", reservation_id: str = "",
) -> None:
    """OrderFulfilled if the store is open, else OrderFulfillmentFailed; once per sale
    (choreography: on InventoryReserved, whose payment and reservation OrderFulfilled
    carries on; orchestration: on PrepareOrder)."""
    if await orders.find(uow, transaction_id, likely_new=True) is not None:
        return  # a redelivery, or a second reservation message for the same sale
    order = Order(transaction_id)
    order.prepare(store_id, await stores.find(uow, store_id),
                  order_id=time_ordered_id(), lines=lines, payment_id=payment_id,
                  reservation_id=reservation_id)
    # A new order stream is saved expecting no stream: a concurrent preparation of the
    # same sale makes this commit fail, and the bus's retry then finds the order.
    orders.save(uow, order)


async def prepare_order(event: RecordedEvent, uow: UnitOfWork) -> None:
    if orchestrated(event):
        return  # the orchestrator sends PrepareOrder for this sale
    reserved: InventoryReserved = SCHEMAS.validate(event)
    await prepare(uow, reserved.transaction_id, reserved.store_id, reserved.lines,
                  reserved.payment_id, reserved.reservation_id)


async def on_prepare_order(event: RecordedEvent, uow: UnitOfWork) -> None:
    command: PrepareOrder = SCHEMAS.validate(event)
    await prepare(uow, command.transaction_id, command.store_id,
                  [StockLine(x.product_id, x.quantity) for x in command.lines])


def handlers() -> dict[str, Handler]:
    """Consumer `store`."""
    return {"InventoryReserved": prepare_order, "PrepareOrder": on_prepare_order}
