"""Dead letters on RabbitMQ beyond the bus contract: what the broker itself dead-letters
past a work queue's delivery limit, and retry queues shared once delays reach their cap."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import RetryPolicy
from magasin.messaging.rabbitmq import RabbitMQBus
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

pytestmark = pytest.mark.rabbitmq
WAIT = 20.0


class ItemAdded(BaseModel):
    sku: str
    qty: int


SCHEMAS = EventSchemas()
SCHEMAS.register("ItemAdded", ItemAdded)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    async with SqliteEventStore(tmp_path / "consumer.db") as opened:
        yield opened


async def never_called(event: RecordedEvent, uow: UnitOfWork) -> None:
    raise AssertionError("the work queue is drained by the test, not by the bus")


async def test_a_message_past_the_delivery_limit_becomes_a_dead_letter_not_a_loss(
    store: SqliteEventStore, amqp_url: str, amqp_namespace: str
) -> None:
    limited = {
        "x-queue-type": "quorum", "x-delivery-limit": 1,
        "x-dead-letter-exchange": f"{amqp_namespace}.dlx",
    }

    def bus() -> RabbitMQBus:
        made = RabbitMQBus(
            amqp_url, store=store, schemas=SCHEMAS, namespace=amqp_namespace,
            work_queue_arguments=limited,
        )
        made.subscribe("carts", {"ItemAdded": never_called})
        return made

    declaring = bus()
    await declaring.start()  # declares the quorum work queue, then leaves it unconsumed
    await declaring.stop()
    (event,) = await store.append("cart-1", [NewEvent("ItemAdded", {"sku": "A", "qty": 1})])
    connection = await aio_pika.connect(amqp_url)
    try:
        # A consumer that keeps handing the message back, as one crashing on it would.
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(event.to_json(), message_id=event.event_id),
            routing_key=f"{amqp_namespace}.carts.p0",
        )
        queue = await channel.get_queue(f"{amqp_namespace}.carts.p0", ensure=False)

        async def refuse(message: AbstractIncomingMessage) -> None:
            await message.nack(requeue=True)

        await queue.consume(refuse)  # (no basic.get on a single-active-consumer queue)
        async with asyncio.timeout(WAIT):
            while not (await channel.declare_queue(f"{amqp_namespace}.carts.dlq", passive=True)
                       ).declaration_result.message_count:
                await asyncio.sleep(0.05)
    finally:
        await connection.close()

    recorder = bus()
    await recorder.start()  # drains the dead-letter queue into the store
    try:
        async def recorded() -> list[Any]:
            return await recorder.dead_letters("carts")

        async with asyncio.timeout(WAIT):
            while not (letters := await recorded()):
                await asyncio.sleep(0.05)
    finally:
        await recorder.stop()
        await recorder.delete_topology()
    (letter,) = letters
    assert letter.reason == "dead-lettered by the broker: delivery_limit"
    assert letter.event is not None and letter.event.event_id == event.event_id


async def test_retries_past_the_capped_delay_share_one_queue(
    store: SqliteEventStore, amqp_url: str, amqp_namespace: str
) -> None:
    tries: list[float] = []
    loop = asyncio.get_running_loop()

    async def fails(event: RecordedEvent, uow: UnitOfWork) -> None:
        tries.append(loop.time())
        raise RuntimeError("still broken")

    policy = RetryPolicy(attempts=6, initial_delay=0.05, multiplier=2, max_delay=0.1, jitter=0)
    assert policy.levels == 2
    bus = RabbitMQBus(amqp_url, store=store, schemas=SCHEMAS, namespace=amqp_namespace)
    bus.subscribe("carts", {"ItemAdded": fails}, retry=policy)
    await bus.start()
    try:
        (event,) = await store.append("cart-1", [NewEvent("ItemAdded", {"sku": "A", "qty": 1})])
        await bus.publish([event])
        async with asyncio.timeout(WAIT):
            while not await bus.dead_letters("carts"):
                await asyncio.sleep(0.05)
    finally:
        await bus.stop()
        await bus.delete_topology()
    (letter,) = await bus.dead_letters("carts")
    assert letter.attempts == len(tries) == 6
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert all(gap >= 0.045 for gap in gaps), gaps
