"""The outbox relay against real stores and a real RabbitMQ: at least once, never a loss."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial

import pytest
from yarl import URL

from magasin.eventstore.store import EventStore
from magasin.messaging.bus import DeadLetter, EventBus, Handler, PartitionState
from magasin.messaging.outbox import OutboxRelay
from magasin.messaging.rabbitmq import RabbitMQBus
from magasin.shared.errors import Unavailable
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent, decode_envelopes
from tests.integration.test_rabbitmq_bus import WAIT, Tap, TcpProxy

pytestmark = pytest.mark.rabbitmq

MakeStore = Callable[..., Awaitable[EventStore]]
MakeBus = Callable[[str], Awaitable[RabbitMQBus]]


class SpyBus(EventBus):
    """Passes publishes on to a real bus, noting each batch size and each failure."""

    def __init__(self, inner: EventBus) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.shipped: list[int] = []
        self.failures: list[Exception] = []
        self.changed = asyncio.Event()

    def subscribe(self, consumer: str, handlers: Mapping[str, Handler]) -> None:
        self.inner.subscribe(consumer, handlers)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self, grace: float = 5.0) -> None:
        await self.inner.stop(grace)

    async def publish(self, events: Sequence[RecordedEvent]) -> None:
        try:
            await self.inner.publish(events)
        except Exception as exc:
            self.failures.append(exc)
            raise
        else:
            self.batches.append(len(events))
        finally:
            self.changed.set()

    async def ship(self, events: Sequence[RecordedEvent]) -> None:
        await self.inner.ship(events)
        self.shipped.append(len(events))
        self.changed.set()

    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        return await self.inner.dead_letters(consumer)

    async def dead_letter(self, letter_id: str) -> DeadLetter:
        return await self.inner.dead_letter(letter_id)

    async def requeue_dead_letter(self, letter_id: str) -> DeadLetter:
        return await self.inner.requeue_dead_letter(letter_id)

    async def archive_dead_letter(self, letter_id: str) -> DeadLetter:
        return await self.inner.archive_dead_letter(letter_id)

    async def partition_states(self) -> list[PartitionState]:
        return await self.inner.partition_states()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class DiesAfterPublishing(SpyBus):
    """The relay's process 'dies' once the broker has the batch but before it is marked sent."""

    def __init__(self, inner: EventBus) -> None:
        super().__init__(inner)
        self.published: list[RecordedEvent] = []
        self.done = asyncio.Event()

    async def publish(self, events: Sequence[RecordedEvent]) -> None:
        await self.inner.publish(events)
        self.published += events
        self.done.set()
        await asyncio.Event().wait()  # until the relay task is cancelled


class _Peek(Exception):
    """Leaves a claimed outbox batch pending (a clean exit would mark it sent)."""


async def pending(store: EventStore) -> list[str]:
    """Event ids waiting in the outbox, without publishing them."""
    ids: list[str] = []
    try:
        async with store.outbox_batch(10_000) as events:
            ids = [e.event_id for e in events]
            raise _Peek
    except _Peek:
        pass
    return ids


async def append_carts(store: EventStore, carts: int, per_cart: int) -> list[str]:
    ids: list[str] = []
    for cart in range(carts):
        events = [NewEvent("ItemAdded", {"sku": f"{cart}-{n}", "qty": 1}) for n in range(per_cart)]
        ids += [e.event_id for e in await store.append(f"cart-{cart}", events)]
    return ids


@pytest.fixture
async def outbox_store(store_factory: MakeStore) -> EventStore:
    return await store_factory(outbox=True)


@pytest.fixture
async def make_bus(
    amqp_url: str, amqp_namespace: str, outbox_store: EventStore
) -> AsyncIterator[MakeBus]:
    """Started publishing buses (no consumers: only the exchanges), cleaned up afterwards."""
    made: list[RabbitMQBus] = []

    async def make(url: str) -> RabbitMQBus:
        bus = RabbitMQBus(
            url, store=outbox_store, schemas=EventSchemas(), namespace=amqp_namespace,
            timeout=0.5,
        )
        made.append(bus)
        await bus.start()
        return bus

    yield make
    for bus in made:
        await bus.stop(grace=0.5)
    if made:
        made[0].url = amqp_url  # not through a proxy a test may have left down
        await made[0].delete_topology()


async def test_every_appended_event_reaches_the_exchange_in_batches(
    outbox_store: EventStore, make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    spy = SpyBus(await make_bus(amqp_url))
    relay = OutboxRelay(outbox_store, spy, batch_size=10, poll_interval=0.05)
    async with Tap(amqp_url, f"{amqp_namespace}.events", "#") as tap:
        ids = await append_carts(outbox_store, carts=5, per_cart=5)
        await relay.start()
        try:
            received = await tap.take(25)
            # The relay is idle now; an append wakes it up.
            ids += await append_carts(outbox_store, carts=1, per_cart=3)
            received = await tap.take(28)
        finally:
            await relay.stop()

    assert sorted(m.message_id or "" for m in received) == sorted(ids)
    assert spy.batches[:3] == [10, 10, 5]
    assert sum(spy.batches) == 28
    # <aggregate>.<type>.<partition>: the relay's bus computes each event's partition.
    assert {(m.routing_key or "").rsplit(".", 1)[0] for m in received} == {"cart.ItemAdded"}
    assert {(m.routing_key or "").rsplit(".", 1)[1] for m in received} <= {"0", "1", "2", "3"}
    assert await pending(outbox_store) == []


async def test_published_events_are_shipped_to_the_whole_log_as_one_message_per_delay(
    outbox_store: EventStore, make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    spy = SpyBus(await make_bus(amqp_url))
    delay = 1.0
    relay = OutboxRelay(outbox_store, spy, batch_size=100, poll_interval=0.05,
                        ship_delay=delay)
    async with Tap(amqp_url, f"{amqp_namespace}.log", "") as tap:
        await relay.start()
        try:
            # The relay ships at multiples of the delay on the clock: start the commits just
            # after one, so that all four fall before the next.
            await asyncio.sleep(delay - time.time() % delay)
            ids: list[str] = []
            for _ in range(4):  # four commits, each published at once on its own
                ids += await append_carts(outbox_store, carts=1, per_cart=3)
                await spy.wait_for(partial(_published, spy, len(ids)))
            (shipped,) = await tap.take(1)
            await asyncio.sleep(0.3)
            assert len(tap.messages) == 1, "the commits within the delay went in one message"
            assert len(spy.batches) == 4
        finally:
            await relay.stop()
    assert [e.event_id for e in decode_envelopes(shipped.body)] == ids
    assert await outbox_store.outbox_backlog(log=True) == 0


def _published(spy: SpyBus, n: int) -> bool:
    return sum(spy.batches) == n


async def test_a_relay_publishes_only_the_consumed_types_and_ships_every_event(
    outbox_store: EventStore, make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    spy = SpyBus(await make_bus(amqp_url))
    relay = OutboxRelay(outbox_store, spy, batch_size=100, poll_interval=0.05, ship_delay=0.1,
                        publishes={"ItemAdded"})
    async with (Tap(amqp_url, f"{amqp_namespace}.events", "#") as events,
                Tap(amqp_url, f"{amqp_namespace}.log", "") as log):
        # A commit with both kinds, then one whose events nobody consumes.
        mixed = await outbox_store.append("cart-1", [
            NewEvent("ItemAdded", {"sku": "a", "qty": 1}),
            NewEvent("ItemPriced", {"sku": "a", "price": 3}),
            NewEvent("ItemAdded", {"sku": "b", "qty": 1}),
        ])
        unconsumed = await outbox_store.append("cart-2", [NewEvent("ItemPriced", {"sku": "c"})])
        await relay.start()
        try:
            received = await events.take(2)
            async with asyncio.timeout(WAIT):
                while sum(len(decode_envelopes(m.body)) for m in log.messages) < 4:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # time for anything else to arrive
        finally:
            await relay.stop()
    assert [m.message_id for m in received] == [mixed[0].event_id, mixed[2].event_id]
    assert len(events.messages) == 2, "an event of a type nobody consumes was published"
    assert sum(spy.batches) == 2
    shipped = [e.event_id for m in log.messages for e in decode_envelopes(m.body)]
    assert shipped == [e.event_id for e in [*mixed, *unconsumed]]
    assert await pending(outbox_store) == []
    assert await outbox_store.outbox_backlog(log=True) == 0


async def test_what_a_stopped_relay_published_but_did_not_ship_is_shipped_by_the_next(
    outbox_store: EventStore, make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    bus = await make_bus(amqp_url)
    ids = await append_carts(outbox_store, carts=2, per_cart=2)
    assert await OutboxRelay(outbox_store, bus).drain() == 4  # published, then a crash
    assert await outbox_store.outbox_backlog(log=True) == 4
    async with Tap(amqp_url, f"{amqp_namespace}.log", "") as tap:
        relay = OutboxRelay(outbox_store, bus, ship_delay=60)
        await relay.start()  # ships what waits at once, not a delay later
        try:
            (shipped,) = await tap.take(1)
        finally:
            await relay.stop()
    assert [e.event_id for e in decode_envelopes(shipped.body)] == ids


async def test_a_relay_killed_between_publish_and_mark_gives_duplicates_never_a_loss(
    outbox_store: EventStore, make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    bus = await make_bus(amqp_url)
    dying = DiesAfterPublishing(bus)
    async with Tap(amqp_url, f"{amqp_namespace}.events", "#") as tap:
        ids = await append_carts(outbox_store, carts=3, per_cart=4)
        first = OutboxRelay(outbox_store, dying, batch_size=5)
        await first.start()
        await asyncio.wait_for(dying.done.wait(), WAIT)
        await first.stop(grace=0.1)
        assert len(dying.published) == 5
        assert sorted(await pending(outbox_store)) == sorted(ids), "the batch was marked sent"

        assert await OutboxRelay(outbox_store, bus, batch_size=5).drain() == 12
        received = await tap.take(17)

    copies = Counter(m.message_id for m in received)
    assert set(copies) == set(ids)
    assert {copies[e.event_id] for e in dying.published} == {2}
    assert sum(copies.values()) == 17
    assert await pending(outbox_store) == []


async def test_while_the_broker_is_unreachable_events_stay_pending_then_all_go_out(
    outbox_store: EventStore, make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    proxy = TcpProxy(URL(amqp_url))
    await proxy.start()
    try:
        spy = SpyBus(await make_bus(proxy.url(amqp_url)))
        async with Tap(amqp_url, f"{amqp_namespace}.events", "#") as tap:
            await proxy.stop()
            ids = await append_carts(outbox_store, carts=1, per_cart=7)
            relay = OutboxRelay(
                outbox_store, spy, batch_size=5, initial_backoff=0.05, max_backoff=0.2
            )
            await relay.start()
            await spy.wait_for(lambda: len(spy.failures) >= 2)
            await relay.stop()
            assert all(isinstance(exc, Unavailable) for exc in spy.failures)
            with pytest.raises(Unavailable):
                await relay.drain()
            assert sorted(await pending(outbox_store)) == sorted(ids)
            assert tap.messages == []

            await proxy.start()
            await relay.start()
            try:
                received = await tap.take(7)
            finally:
                await relay.stop()
        assert sorted(m.message_id or "" for m in received) == sorted(ids)
        assert await pending(outbox_store) == []
    finally:
        await proxy.stop()
