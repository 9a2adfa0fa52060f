"""Dead letters at volume: how long N failing messages take to be dead-lettered, how long a
bulk requeue of them takes, and how long until the fixed consumer has handled them all.

Prints one JSON object per bus:
  {"bus", "letters", "dead_lettered_s", "requeue_s", "handled_after_requeue_s",
   "effects", "requeued_per_s"}
`effects` must equal `letters` (each requeued message takes effect once).

    python bench/dead_letters.py [--letters 500] [--only inprocess|rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.messaging.bus import EventBus, RetryPolicy
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

AMQP_URL = os.environ.get("MAGASIN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RETRY = RetryPolicy(attempts=2, initial_delay=0.01, jitter=0.0)


class ItemAdded(BaseModel):
    sku: str
    qty: int


SCHEMAS = EventSchemas()
SCHEMAS.register("ItemAdded", ItemAdded)


class Fixable:
    def __init__(self) -> None:
        self.broken = True

    async def __call__(self, event: RecordedEvent, uow: UnitOfWork) -> None:
        if self.broken:
            raise RuntimeError("not fixed yet")
        uow.put_document("effects", event.event_id, {"n": 1})


async def until(check: object, timeout: float = 600.0) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        while not await check():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def count(store: EventStore, collection: str) -> int:
    n, after = 0, None
    while page := await store.find_documents(collection, after_key=after, limit=1000):
        n += len(page)
        after = page[-1][0]
    return n


async def run(kind: str, letters: int, directory: Path) -> dict[str, object]:
    store = SqliteEventStore(directory / f"{kind}.db")
    await store.open()
    bus: EventBus
    if kind == "inprocess":
        from magasin.messaging.inprocess import InProcessBus

        bus = InProcessBus(store, SCHEMAS, retry=RETRY, poll_interval=0.05)
    else:
        from magasin.messaging.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(AMQP_URL, store=store, schemas=SCHEMAS,
                          namespace=f"bench-{uuid.uuid4().hex[:8]}", retry=RETRY)
    handler = Fixable()
    bus.subscribe("carts", {"ItemAdded": handler})
    await bus.start()
    try:
        events = await store.append(
            "cart-1", [NewEvent("ItemAdded", {"sku": f"s{n}", "qty": 1}) for n in range(letters)]
        )
        await bus.publish(events)

        async def all_dead() -> bool:
            return len(await bus.dead_letters("carts")) >= letters

        dead_s = await until(all_dead)
        handler.broken = False
        started = time.perf_counter()
        requeued = await bus.requeue_dead_letters("carts")
        requeue_s = time.perf_counter() - started

        async def all_handled() -> bool:
            return await count(store, "effects") >= letters

        handled_s = await until(all_handled) + requeue_s
        await asyncio.sleep(0.5)  # room for a second effect to show up
        effects = await count(store, "effects")
    finally:
        await bus.stop()
        if kind == "rabbitmq":
            await bus.delete_topology()  # type: ignore[attr-defined]
        await store.close()
    return {
        "bus": kind, "letters": len(requeued), "dead_lettered_s": round(dead_s, 2),
        "requeue_s": round(requeue_s, 2), "handled_after_requeue_s": round(handled_s, 2),
        "effects": effects, "requeued_per_s": round(len(requeued) / requeue_s),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--letters", type=int, default=500)
    parser.add_argument("--only", choices=("inprocess", "rabbitmq"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("inprocess", "rabbitmq"):
            if args.only in (None, kind):
                print(json.dumps(await run(kind, args.letters, Path(tmp))), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
