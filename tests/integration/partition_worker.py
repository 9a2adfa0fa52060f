"""One consumer process of the partition tests: a RabbitMQ bus consuming `keys` with the
contract suite's KeyedLog handler over a shared PostgreSQL schema, until SIGTERM.

    python -m tests.integration.partition_worker PG_URL SCHEMA AMQP_URL NAMESPACE LEASE
"""

from __future__ import annotations

import asyncio
import signal
import sys

from magasin.eventstore.postgres import PostgresEventStore
from magasin.messaging.rabbitmq import RabbitMQBus
from tests.contracts.test_event_bus import SCHEMAS, KeyedLog

PARTITIONS = 4


async def main(pg_url: str, schema: str, amqp_url: str, namespace: str, lease: float) -> None:
    store = PostgresEventStore(pg_url, schema=schema, pool_max=3)  # a shared server
    await store.open()
    bus = RabbitMQBus(amqp_url, store=store, schemas=SCHEMAS, namespace=namespace,
                      partitions=PARTITIONS, lease=lease, workers=16)
    bus.subscribe("keys", {"ItemAdded": KeyedLog()})
    await bus.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"ready {bus.member}", flush=True)
    await stop.wait()
    await bus.stop()
    await store.close()


if __name__ == "__main__":
    url, schema, amqp, ns, lease = sys.argv[1:6]
    asyncio.run(main(url, schema, amqp, ns, float(lease)))
