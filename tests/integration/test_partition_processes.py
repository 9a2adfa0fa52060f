"""Partitions shared by real processes of one service (issue 12): balance, takeover after a
`kill -9`, and per-key order with exactly one effect while processes die and come back."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from magasin.eventstore.postgres import PostgresEventStore
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.messaging.ownership import leases
from magasin.messaging.rabbitmq import RabbitMQBus
from tests.conftest import run_sync
from tests.contracts.test_event_bus import SCHEMAS, eventually, keyed_burst, keyed_effects
from tests.integration.partition_worker import PARTITIONS

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

LEASE = 1.5
TAKEOVER = LEASE + LEASE / 3 + 2.0
"""The stated bound: a dead process's partitions have a new owner once its lease expired
and a survivor's next renewal ran (plus slack for a loaded 2-core machine)."""
ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """`partition_worker` processes, started, killed and restarted at will."""

    def __init__(self, args: list[str], logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"worker-{len(os.listdir(self.logs))}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.partition_worker", *self.args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        self.running.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.running.remove(process)

    def stop_all(self) -> None:
        for process in self.running:
            process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.running.clear()


@pytest.fixture
async def shared_store(pg_database: str, pg_schema: str) -> AsyncIterator[PostgresEventStore]:
    store = PostgresEventStore(pg_database, schema=pg_schema)
    await store.open()  # the schema exists before the workers open it
    yield store
    await store.close()


@pytest.fixture
def workers(
    pg_database: str, pg_schema: str, amqp_url: str, amqp_namespace: str, tmp_path: Path
) -> Iterator[Callable[[], Workers]]:
    made: list[Workers] = []

    def make() -> Workers:
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        made.append(Workers([pg_database, pg_schema, amqp_url, amqp_namespace, str(LEASE)],
                            logs))
        return made[-1]

    yield make
    for w in made:
        w.stop_all()
    if made:
        # Once no process is left: a live one's robust channels would declare again the
        # queues deleted under them (and the machine's broker would keep them).
        run_sync(_delete_topology(amqp_url, amqp_namespace, tmp_path))


async def _delete_topology(amqp_url: str, namespace: str, tmp_path: Path) -> None:
    """Delete the queues and exchanges the workers declared (consumer `keys`)."""
    store = SqliteEventStore(tmp_path / "topology.db")
    bus = RabbitMQBus(amqp_url, store=store, schemas=SCHEMAS, namespace=namespace,
                      partitions=PARTITIONS)
    bus.subscribe("keys", {"ItemAdded": lambda *_: asyncio.sleep(0)})
    await bus.delete_topology()


@pytest.fixture
async def publisher(
    amqp_url: str, amqp_namespace: str, tmp_path: Path
) -> AsyncIterator[tuple[SqliteEventStore, RabbitMQBus]]:
    producer = SqliteEventStore(tmp_path / "producer.db")
    await producer.open()
    bus = RabbitMQBus(amqp_url, store=producer, schemas=SCHEMAS, namespace=amqp_namespace,
                      partitions=PARTITIONS)
    await bus.start()
    yield producer, bus
    await bus.stop()  # the workers' fixture deletes the topology, once they are stopped
    await producer.close()


async def owners(store: PostgresEventStore, namespace: str) -> dict[int, str]:
    return {lease.partition: lease.owner for lease in await leases(store, f"{namespace}.keys")}


def shares(owned: dict[int, str]) -> list[int]:
    counts: dict[str, int] = {}
    for owner in owned.values():
        counts[owner] = counts.get(owner, 0) + 1
    return sorted(counts.values())


async def test_two_processes_own_two_partitions_each_and_a_survivor_takes_all_four(
    shared_store: PostgresEventStore, workers: Callable[[], Workers], amqp_namespace: str,
) -> None:
    pool = workers()
    first, _ = pool.start(), pool.start()

    async def balanced() -> bool:
        owned = await owners(shared_store, amqp_namespace)
        return len(owned) == PARTITIONS and shares(owned) == [2, 2]

    await eventually(balanced, timeout=30.0)
    pool.kill(first)  # kill -9: no goodbye, its leases must expire

    async def one_owner() -> bool:
        owned = await owners(shared_store, amqp_namespace)
        return len(owned) == PARTITIONS and shares(owned) == [4]

    await eventually(one_owner, timeout=TAKEOVER)
    pool.start()
    await eventually(balanced, timeout=30.0)


async def test_each_keys_events_take_effect_once_in_order_while_processes_are_killed(
    shared_store: PostgresEventStore,
    workers: Callable[[], Workers],
    publisher: tuple[SqliteEventStore, RabbitMQBus],
    amqp_namespace: str,
) -> None:
    """4 processes, 2,000 events over 50 keys, a random process killed -9 (and started
    again) every 2 s until every event took effect."""
    producer, bus = publisher
    pool = workers()
    for _ in range(4):
        pool.start()

    async def shared_by_four() -> bool:  # their queues exist: nothing published is unrouted
        owned = await owners(shared_store, amqp_namespace)
        return len(owned) == PARTITIONS and shares(owned) == [1, 1, 1, 1]

    await eventually(shared_by_four, timeout=30.0)
    burst = await keyed_burst(producer, keys=50, per_key=40)
    rng = random.Random(12)
    loop = asyncio.get_running_loop()
    kills = 0

    async def publish() -> None:
        for start in range(0, len(burst), 100):
            await bus.publish(burst[start:start + 100])
            await asyncio.sleep(0.5)  # 10 s of publishing: kills land mid-stream

    publishing = asyncio.create_task(publish())
    deadline = loop.time() + 50.0
    next_kill = loop.time() + 2.0
    while loop.time() < deadline:
        done = len(await shared_store.find_documents("effects", limit=10_000))
        if done >= len(burst) and publishing.done():
            break
        if loop.time() >= next_kill:
            pool.kill(rng.choice(pool.running))
            pool.start()
            kills += 1
            next_kill = loop.time() + 2.0
        await asyncio.sleep(0.2)
    await publishing
    assert kills >= 2, "the run ended before processes were killed"
    assert await keyed_effects(shared_store) == {
        f"customer-{k}": list(range(40)) for k in range(50)}
    assert len(await shared_store.find_documents("effects", limit=10_000)) == len(burst)
