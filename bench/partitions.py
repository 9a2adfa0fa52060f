"""Throughput of one consumer by partitions (1, 2, 4) and processes (1, 2) on RabbitMQ +
PostgreSQL, with a handler that waits 5 ms on I/O (so the 2 cores are not the limit), and
per-key order checked after each run. Prints one JSON document: the bare broker's floor
(publish + consume with no handler, no database), each configuration's events/s, and the
ratio of 4 partitions to 1.

    .venv/bin/python bench/partitions.py [--events 1000] [--keys 50]

Each partition is handled one run of messages at a time here (`batch=2`: a partition's
messages go through one task, in order, whatever their keys), so partitions are the only
parallelism and the figure shows what they buy. A service's default (`batch=1`) also runs
different keys of one partition at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from pydantic import BaseModel

from magasin.eventstore.postgres import PostgresEventStore
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import ANY, Append, UnitOfWork
from magasin.messaging.ownership import leases
from magasin.messaging.rabbitmq import RabbitMQBus
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

PG_URL = os.environ.get("MAGASIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("MAGASIN_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IO_WAIT = 0.005
CONSUMER = "inventory"


class StockAsked(BaseModel):
    key: str
    seq: int


SCHEMAS = EventSchemas()
SCHEMAS.register("StockAsked", StockAsked)


async def handle(event: RecordedEvent, uow: UnitOfWork) -> None:
    await asyncio.sleep(IO_WAIT)  # the outside call
    key, seq = event.payload["key"], event.payload["seq"]
    seen = await uow.get_document("keys", key) or {"seen": []}
    uow.put_document("keys", key, {"seen": [*seen["seen"], seq]})


async def worker(db: str, schema: str, namespace: str, partitions: int) -> None:
    store = PostgresEventStore(db, schema=schema, pool_max=4)
    await store.open()
    bus = RabbitMQBus(AMQP_URL, store=store, schemas=SCHEMAS, namespace=namespace,
                      partitions=partitions, batch=2, lease=1.5)
    bus.subscribe(CONSUMER, {"StockAsked": handle})
    await bus.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await bus.stop()
    await store.close()


async def floor(events: list[RecordedEvent]) -> float:
    """Bare broker: the same messages through one queue, acked with no work at all."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(exclusive=True)
        got = asyncio.Event()
        count = 0

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count == len(events):
                got.set()

        await queue.consume(take)
        started = time.perf_counter()
        await asyncio.gather(*(channel.default_exchange.publish(
            aio_pika.Message(e.to_json()), queue.name) for e in events))
        await got.wait()
        return len(events) / (time.perf_counter() - started)
    finally:
        await connection.close()


async def run(db: str, events: list[RecordedEvent], keys: int, partitions: int,
              processes: int) -> dict[str, Any]:
    schema, namespace = f"p_{uuid.uuid4().hex[:10]}", f"bench-part-{uuid.uuid4().hex[:8]}"
    store = PostgresEventStore(db, schema=schema, pool_max=4)
    await store.open()
    publisher_store = SqliteEventStore(Path(tempfile.mkdtemp()) / "p.db")
    await publisher_store.open()
    publisher = RabbitMQBus(AMQP_URL, store=publisher_store, schemas=SCHEMAS,
                            namespace=namespace, partitions=partitions)
    await publisher.start()
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--worker", db, schema, namespace, str(partitions))
        for _ in range(processes)]
    try:
        async with asyncio.timeout(60):
            while True:  # every partition owned, by every process: queues declared
                owned = await leases(store, f"{namespace}.{CONSUMER}")
                if len(owned) == partitions and len({x.owner for x in owned}) == min(
                        processes, partitions):
                    break
                await asyncio.sleep(0.1)
        started = time.perf_counter()
        await publisher.publish(events)
        async with asyncio.timeout(600):
            while True:
                docs = await store.find_documents("keys", limit=10_000)
                if sum(len(d["seen"]) for _, d in docs) >= len(events):
                    break
                await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        per_key = len(events) // keys
        ordered = all(d["seen"] == list(range(per_key)) for _, d in docs) and len(docs) == keys
        return {"partitions": partitions, "processes": processes,
                "events_per_s": round(len(events) / elapsed, 1),
                "seconds": round(elapsed, 2), "order_per_key_held": ordered}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            await asyncio.wait_for(p.wait(), 30)
        await publisher.stop()
        publisher.subscribe(CONSUMER, {"StockAsked": handle})  # its queues, to delete them
        await publisher.delete_topology()
        await publisher_store.close()
        await store.close()


async def main(total: int, keys: int) -> None:
    suffix = uuid.uuid4().hex[:8]
    server = PG_URL.rsplit("/", 1)[0]
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "magasin_bench_{suffix}"')
    db = f"{server}/magasin_bench_{suffix}"
    try:
        producer = SqliteEventStore(Path(tempfile.mkdtemp()) / "events.db")
        await producer.open()
        per_key = total // keys
        events = await producer.commit([
            Append(f"stock-{k}-{n}", (NewEvent("StockAsked", {"key": f"k{k}", "seq": n},
                                               metadata={"partition_key": f"k{k}"}),), ANY)
            for n in range(per_key) for k in range(keys)
        ])
        await producer.close()
        bare = await floor(events)
        runs = [await run(db, events, keys, partitions, processes)
                for processes in (1, 2) for partitions in (1, 2, 4)]
        one = next(r for r in runs if (r["partitions"], r["processes"]) == (1, 1))
        four = next(r for r in runs if (r["partitions"], r["processes"]) == (4, 1))
        print(json.dumps({
            "events": len(events), "keys": keys, "handler_io_wait_ms": IO_WAIT * 1000,
            "floor_bare_broker_events_per_s": round(bare, 1),
            "runs": runs,
            "ratio_4_partitions_to_1": round(four["events_per_s"] / one["events_per_s"], 2),
        }, indent=2))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "magasin_bench_{suffix}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        asyncio.run(worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--events", type=int, default=1000)
        parser.add_argument("--keys", type=int, default=50)
        args = parser.parse_args()
        asyncio.run(main(args.events, args.keys))
