"""Handlers of the store service: preparing the order of a sale whose stock is reserved."""

from __future__ import annotations

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.shared.events import SCHEMAS, InventoryReserved
from magasin.shared.ids import time_ordered_id
from magasin.shared.messages import RecordedEvent
from magasin.stores.domain import Order, Store

orders = Repository(Order)
stores = Repository(Store)


async def prepare_order(event: RecordedEvent, uow: UnitOfWork) -> None:
    """OrderFulfilled if the store is open, else OrderFulfillmentFailed; once per sale."""
    reserved: InventoryReserved = SCHEMAS.validate(event)
    if await orders.find(uow, reserved.transaction_id) is not None:
        return  # a redelivery, or a second reservation message for the same sale
    order = Order(reserved.transaction_id)
    order.prepare(reserved.store_id, await stores.find(uow, reserved.store_id),
                  order_id=time_ordered_id(), lines=reserved.lines)
    # A new order stream is saved expecting no stream: a concurrent preparation of the
    # same sale makes this commit fail, and the bus's retry then finds the order.
    orders.save(uow, order)


def handlers() -> dict[str, Handler]:
    """Consumer `store`."""
    return {"InventoryReserved": prepare_order}
