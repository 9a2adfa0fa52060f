"""`magasin dead-letters … --distributed --service S` on one service's PostgreSQL and
RabbitMQ, while that service runs in another process (here: another event loop)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from magasin.cli import app as cli
from magasin.eventstore.postgres import PostgresEventStore
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import RetryPolicy
from magasin.messaging.rabbitmq import RabbitMQBus
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]
WAIT = 20.0


class ItemAdded(BaseModel):
    sku: str
    qty: int


SCHEMAS = EventSchemas()
SCHEMAS.register("ItemAdded", ItemAdded)


class Fixable:
    def __init__(self) -> None:
        self.broken = True
        self.handled: list[str] = []

    async def __call__(self, event: RecordedEvent, uow: UnitOfWork) -> None:
        if self.broken:
            raise RuntimeError("not fixed yet")
        self.handled.append(event.event_id)


@pytest.fixture
async def service(
    pg_database: str, pg_schema: str, amqp_url: str, amqp_namespace: str
) -> AsyncIterator[tuple[RabbitMQBus, Fixable, dict[str, str]]]:
    store = PostgresEventStore(pg_database, schema=pg_schema)
    await store.open()
    handler = Fixable()
    bus = RabbitMQBus(amqp_url, store=store, schemas=SCHEMAS, namespace=amqp_namespace,
                      retry=RetryPolicy(attempts=2, initial_delay=0.02, jitter=0))
    bus.subscribe("carts", {"ItemAdded": handler})
    await bus.start()
    env = {
        "MAGASIN_DATABASE_URL": pg_database, "MAGASIN_DATABASE_SCHEMA": pg_schema,
        "MAGASIN_AMQP_URL": amqp_url, "MAGASIN_AMQP_NAMESPACE": amqp_namespace,
        "COLUMNS": "250",
    }
    try:
        yield bus, handler, env
    finally:
        await bus.stop()
        await bus.delete_topology()
        await store.close()


async def magasin(env: dict[str, str], *args: str) -> str:
    result = await asyncio.to_thread(
        CliRunner().invoke, cli,
        ["dead-letters", *args, "--distributed", "--service", "payment"], env=env,
    )
    assert result.exit_code == 0, result.output
    return result.output


async def test_the_cli_requeues_a_dead_letter_to_the_running_service(
    service: tuple[RabbitMQBus, Fixable, dict[str, str]],
) -> None:
    bus, handler, env = service
    (event,) = await bus.store.append("cart-1", [NewEvent("ItemAdded", {"sku": "A", "qty": 1})])
    await bus.publish([event])

    async def dead() -> list[Any]:
        return await bus.dead_letters("carts")

    async with asyncio.timeout(WAIT):
        while not (letters := await dead()):
            await asyncio.sleep(0.05)
    (letter,) = letters
    assert letter.id in await magasin(env, "list")
    assert "not fixed yet" in await magasin(env, "show", letter.id)

    handler.broken = False
    assert "requeued" in await magasin(env, "requeue", letter.id)
    async with asyncio.timeout(WAIT):
        while not handler.handled:
            await asyncio.sleep(0.05)
    assert handler.handled == [event.event_id]
    assert letter.id not in await magasin(env, "list")
