"""Schema evolution: events stored with an older schema version are upgraded on read."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.dispatch import Outcome, deliver
from magasin.messaging.inprocess import InProcessBus
from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import MalformedMessage
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent
from tests.unit.conftest import Harness


@dataclass(frozen=True)
class ItemAdded:
    """Version 2: version 1 said `sku` and `qty`, and had no currency."""

    product_id: str
    quantity: int
    currency: str


def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    return {"product_id": payload["sku"], "quantity": payload["qty"], "currency": "CAD"}


class Cart(Aggregate):
    stream_type = "cart"

    def __init__(self, ident: str) -> None:
        super().__init__(ident)
        self.items: dict[str, int] = {}

    def add(self, product_id: str, quantity: int) -> None:
        self._record(ItemAdded(product_id, quantity, "CAD"))

    def apply(self, event: object) -> None:
        assert isinstance(event, ItemAdded)
        self.items[event.product_id] = self.items.get(event.product_id, 0) + event.quantity


@pytest.fixture
def schemas() -> EventSchemas:
    registry = EventSchemas()
    registry.register("ItemAdded", ItemAdded)
    registry.register_upcaster("ItemAdded", 1, v1_to_v2)
    return registry


def v1_event() -> NewEvent:
    return NewEvent("ItemAdded", {"sku": "p1", "qty": 2}, schema_version=1)


async def test_a_v1_event_stored_raw_is_read_as_v2_through_the_repository(
    harness: Harness, schemas: EventSchemas
) -> None:
    await harness.store.append("cart-1", [v1_event()])
    carts = Repository(Cart, schemas)

    async with harness.store.transaction() as uow:
        cart = await carts.get(uow, "1")
        cart.add("p1", 1)
        carts.save(uow, cart)

    assert cart.items == {"p1": 3}
    stored = await harness.store.read_stream("cart-1")
    assert [e.schema_version for e in stored] == [1, 2]  # old events are never rewritten
    assert stored[1].payload == {"product_id": "p1", "quantity": 1, "currency": "CAD"}


async def test_a_v1_event_reaches_a_handler_as_v2(
    harness: Harness, schemas: EventSchemas
) -> None:
    (stored,) = await harness.store.append("cart-1", [v1_event()])
    seen: list[RecordedEvent] = []

    async def handler(event: RecordedEvent, uow: UnitOfWork) -> None:
        seen.append(event)

    result = await deliver(harness.store, schemas, "carts", handler, stored)

    assert result.outcome is Outcome.HANDLED
    assert (seen[0].schema_version, seen[0].payload["product_id"]) == (2, "p1")
    assert schemas.validate(stored) == ItemAdded("p1", 2, "CAD")


async def test_the_in_process_bus_delivers_old_events_upcast(
    harness: Harness, schemas: EventSchemas
) -> None:
    await harness.store.append("cart-1", [v1_event()])
    seen: asyncio.Queue[RecordedEvent] = asyncio.Queue()

    async def handler(event: RecordedEvent, uow: UnitOfWork) -> None:
        seen.put_nowait(event)

    bus = InProcessBus(harness.store, schemas, poll_interval=0.05)
    bus.subscribe("carts", {"ItemAdded": handler})
    await bus.start()
    try:
        event = await asyncio.wait_for(seen.get(), 10)
    finally:
        await bus.stop()
    assert event.schema_version == 2
    assert event.payload == {"product_id": "p1", "quantity": 2, "currency": "CAD"}


def test_an_event_of_a_version_newer_than_known_is_malformed(schemas: EventSchemas) -> None:
    future = RecordedEvent("e1", "ItemAdded", 3, "cart-1", 1, 1, None,  # type: ignore[arg-type]
                           None, None, None, {}, {"product_id": "p", "quantity": 1})
    with pytest.raises(MalformedMessage, match="schema version 3"):
        schemas.validate(future)


def test_upcasters_are_declared_in_version_order(schemas: EventSchemas) -> None:
    assert schemas.version_of("ItemAdded") == 2
    with pytest.raises(ValueError, match="version 2"):
        schemas.register_upcaster("ItemAdded", 3, v1_to_v2)
