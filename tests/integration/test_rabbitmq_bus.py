"""RabbitMQ-specific behaviour of RabbitMQBus that the shared bus contract cannot express."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from aio_pika.message import IncomingMessage
from pydantic import BaseModel
from yarl import URL

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import UnitOfWork
from magasin.messaging import rabbitmq
from magasin.messaging.bus import Handler, RetryPolicy
from magasin.messaging.ownership import LEASES
from magasin.messaging.partitioning import KEY_FIELD
from magasin.messaging.rabbitmq import RabbitMQBus
from magasin.shared.clock import utcnow
from magasin.shared.errors import Unavailable
from magasin.shared.ids import new_id
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent
from tests.contracts.test_event_bus import KeyedLog, keyed_burst, keyed_effects

pytestmark = pytest.mark.rabbitmq

FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.05, jitter=0.0)
WAIT = 20.0


class ItemAdded(BaseModel):
    sku: str
    qty: int


class CartClosed(BaseModel):
    reason: str


SCHEMAS = EventSchemas()
SCHEMAS.register("ItemAdded", ItemAdded)
SCHEMAS.register("CartClosed", CartClosed)

_positions = itertools.count(1)


def item_added(sku: str = "A", *, traceparent: str | None = None) -> RecordedEvent:
    """An event as a producer's store recorded it (the consumer side never reads it back)."""
    position = next(_positions)
    return RecordedEvent(
        event_id=new_id(), type="ItemAdded", schema_version=1, stream_id=f"cart-{position}",
        stream_version=1, global_position=position, occurred_at=utcnow(),
        correlation_id="tx-1", causation_id=None, traceparent=traceparent,
        metadata={}, payload={"sku": sku, "qty": 1},
    )


class Recorder:
    """A handler that records what it got, fails its first `fail_times` tries of each
    event, and otherwise writes one document per event as its effect."""

    def __init__(self, fail_times: int = 0) -> None:
        self.calls: list[RecordedEvent] = []
        self.fail_times = fail_times
        self.changed = asyncio.Event()

    async def __call__(self, event: RecordedEvent, uow: UnitOfWork) -> None:
        self.calls.append(event)
        self.changed.set()
        if sum(c.event_id == event.event_id for c in self.calls) <= self.fail_times:
            raise RuntimeError(f"boom on {event.payload['sku']}")
        uow.put_document("effects", event.event_id, {"sku": event.payload["sku"]})

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def eventually(check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll a condition that nothing signals (a store read), within a bound."""
    async with asyncio.timeout(WAIT):
        while True:
            if result := await check():
                return result
            await asyncio.sleep(0.02)


class Tap:
    """A throwaway queue bound to an exchange, to see exactly what the broker routes there."""

    def __init__(self, url: str, exchange: str, routing_key: str) -> None:
        self.url, self.exchange, self.routing_key = url, exchange, routing_key
        self.messages: list[AbstractIncomingMessage] = []
        self._changed = asyncio.Event()
        self._connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(exclusive=True)  # gone with the connection
        await queue.bind(self.exchange, self.routing_key)
        await queue.consume(self._got, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _got(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self._changed.set()

    async def take(self, n: int) -> list[AbstractIncomingMessage]:
        async with asyncio.timeout(WAIT):
            while len(self.messages) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.messages[:n]


class TcpProxy:
    """A TCP relay to the broker that a test can cut, to play a network failure."""

    def __init__(self, target: URL) -> None:
        self.target_host = target.host or "127.0.0.1"
        self.target_port = target.port or 5672
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, amqp_url: str) -> str:
        # A short reconnect interval so the bus comes back quickly once the relay is up.
        return str(URL(amqp_url).with_port(self.port).update_query(reconnect_interval="0.1"))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and drop the open ones: the broker is 'down'."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    def cut(self) -> None:
        """Drop the open connections only: a network blip."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, broker_w}
        await asyncio.gather(_forward(client_r, broker_w), _forward(broker_r, client_w))


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # the other side was cut: that is the point
    finally:
        writer.transport.abort()


MakeBus = Callable[..., Awaitable[RabbitMQBus]]


@pytest.fixture
async def consumer_store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    store = SqliteEventStore(tmp_path / "consumer.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def make_bus(
    amqp_url: str, amqp_namespace: str, consumer_store: SqliteEventStore
) -> AsyncIterator[MakeBus]:
    """Started buses over the consumer store, stopped and their topology deleted afterwards."""
    made: list[RabbitMQBus] = []

    async def make(
        subscriptions: dict[str, dict[str, Handler]],
        *,
        retry: RetryPolicy = FAST_RETRY,
        url: str = amqp_url,
        requires: dict[str, str] | None = None,
        whole_log: set[str] | None = None,
        **options: Any,
    ) -> RabbitMQBus:
        bus = RabbitMQBus(
            url, store=consumer_store, schemas=SCHEMAS, namespace=amqp_namespace,
            retry=retry, **options,
        )
        for consumer, handlers in subscriptions.items():
            bus.subscribe(consumer, handlers, requires=(requires or {}).get(consumer),
                          whole_log=consumer in (whole_log or set()))
        made.append(bus)
        await bus.start()
        return bus

    yield make
    for bus in made:
        await bus.stop(grace=0.5)
    for bus in made:
        # Through the real broker: a test may have left a proxy down.
        bus.url = amqp_url
        await bus.delete_topology()


async def test_bad_json_is_dead_lettered_at_once_and_the_consumer_goes_on(
    make_bus: MakeBus,
) -> None:
    got = Recorder()
    bus = await make_bus({"carts": {"ItemAdded": got}})
    good = item_added("good")

    await bus.publish_raw("cart.ItemAdded", b'{"event_id": oops')
    await bus.publish([good])

    (letter,) = await eventually(lambda: bus.dead_letters("carts"))
    await got.wait_for(lambda: len(got.calls) == 1)
    assert got.calls == [good]
    assert "JSON" in letter.reason
    assert letter.attempts == 1
    assert letter.event is None
    assert letter.body == '{"event_id": oops'
    assert letter.routing_key == "cart.ItemAdded"


async def test_an_event_type_the_consumer_does_not_handle_is_dead_lettered_at_once(
    make_bus: MakeBus,
) -> None:
    got = Recorder()
    bus = await make_bus({"carts": {"ItemAdded": got}})
    # Routed as ItemAdded, but the envelopes say otherwise: one type is known to the schema
    # registry but not handled here, the other is known to nobody.
    for kind in ("CartClosed", "Mystery"):
        envelope = item_added()
        body = envelope.to_json().replace(b'"type":"ItemAdded"', f'"type":"{kind}"'.encode())
        await bus.publish_raw("cart.ItemAdded", body)
    await bus.publish([item_added("marker")])

    letters = await eventually(lambda: _at_least(bus.dead_letters("carts"), 2))
    await got.wait_for(lambda: len(got.calls) == 1)
    assert [c.payload["sku"] for c in got.calls] == ["marker"]
    assert sorted(letter.event.type for letter in letters if letter.event) == [
        "CartClosed", "Mystery",
    ]
    for letter in letters:
        assert "unknown event type" in letter.reason
        assert letter.attempts == 1


def _consumed(consumer: str, event_type: str, outcome: str) -> float:
    from magasin.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value(
        "magasin_events_consumed_total",
        {"event_type": event_type, "consumer": consumer, "service": consumer,
         "outcome": outcome}) or 0.0


def closed(reason: str) -> RecordedEvent:
    return dataclasses.replace(item_added(), type="CartClosed", payload={"reason": reason})


async def test_a_type_the_consumer_no_longer_handles_loses_its_binding_at_its_first_message(
    make_bus: MakeBus,
) -> None:
    """An upgrade: a consumer that stopped handling CartClosed still has its queues bound
    for it. The first CartClosed is acked, not dead-lettered, and its binding removed: the
    next one never reaches the queue."""
    before = await make_bus({"carts": {"ItemAdded": Recorder(), "CartClosed": Recorder()}},
                            partitions=1)
    await before.stop()
    got = Recorder()
    bus = await make_bus({"carts": {"ItemAdded": got}}, partitions=1)
    unbound = _consumed("carts", "CartClosed", "unbound")
    await bus.publish([closed("first"), item_added("marker-1")])
    await got.wait_for(lambda: len(got.calls) == 1)
    # Counted once its binding is gone (the marker may be handled alongside).
    await eventually(lambda: _true(_consumed("carts", "CartClosed", "unbound") == unbound + 1))
    assert await bus.dead_letters("carts") == []
    await bus.stop()
    publisher = await make_bus({}, partitions=1)
    await publisher.publish([closed("second"), item_added("marker-2")])
    assert await depths(bus) == {"carts": 1}, "CartClosed still reaches the queue"


async def _at_least(letters: Awaitable[list[Any]], n: int) -> list[Any] | None:
    found = await letters
    return found if len(found) >= n else None


async def test_a_retry_waits_in_its_own_queue_while_later_messages_go_first(
    make_bus: MakeBus,
) -> None:
    loop = asyncio.get_running_loop()
    tries: dict[str, list[float]] = {}
    changed = asyncio.Event()

    async def fails_twice_on_a(event: RecordedEvent, uow: UnitOfWork) -> None:
        sku = event.payload["sku"]
        tries.setdefault(sku, []).append(loop.time())
        changed.set()
        if sku == "A" and len(tries["A"]) < 3:
            raise RuntimeError("transient")
        uow.put_document("effects", event.event_id, {})

    order: list[str] = []

    async def handler(event: RecordedEvent, uow: UnitOfWork) -> None:
        order.append(event.payload["sku"])
        await fails_twice_on_a(event, uow)

    # One message at a time: a retry that sat in the work queue would hold up B..E.
    retry = RetryPolicy(attempts=3, initial_delay=0.5, multiplier=1.0, jitter=0.0)
    bus = await make_bus({"carts": {"ItemAdded": handler}}, retry=retry, prefetch=1)
    await bus.publish([item_added("A")])
    await bus.publish([item_added(sku) for sku in "BCDE"])

    async with asyncio.timeout(WAIT):
        while len(tries.get("A", [])) < 3:
            changed.clear()
            await changed.wait()
    assert order[0] == "A"
    assert sorted(order[1:5]) == ["B", "C", "D", "E"], f"B..E waited behind A: {order}"
    assert order[5:] == ["A", "A"]
    first, second, third = tries["A"]
    assert second - first >= 0.45
    assert third - second >= 0.45
    assert (await bus.dead_letters("carts")) == []


async def test_a_dead_lettered_message_carries_why_who_how_often_and_where_from(
    make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    broken = Recorder(fail_times=99)
    bus = await make_bus({"broken": {"ItemAdded": broken}})
    event = item_added("X", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")

    async with Tap(amqp_url, f"{amqp_namespace}.dlx", "broken") as dlx:
        await bus.publish([event])
        (message,) = await dlx.take(1)

    assert message.headers["x-magasin-consumer"] == "broken"
    assert message.headers["x-magasin-attempts"] == 3
    assert message.headers["x-magasin-original-routing-key"] == "cart.ItemAdded"
    reason = message.headers["x-magasin-reason"]
    assert isinstance(reason, str)
    assert "RuntimeError: boom on X" in reason
    assert message.headers["traceparent"] == event.traceparent
    assert message.body == event.to_json()
    assert message.message_id == event.event_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert len(broken.calls) == 3

    (letter,) = await eventually(lambda: bus.dead_letters("broken"))
    assert letter.id == f"broken:{event.event_id}"
    assert (letter.consumer, letter.attempts, letter.routing_key) == (
        "broken", 3, "cart.ItemAdded",
    )
    assert letter.reason == reason
    assert letter.event == event


async def test_two_processes_share_the_partitions_with_one_effect_per_event(
    make_bus: MakeBus, consumer_store: SqliteEventStore, amqp_url: str, amqp_namespace: str
) -> None:
    seen: list[list[str]] = [[], []]

    def counting(who: int) -> Handler:
        async def count(event: RecordedEvent, uow: UnitOfWork) -> None:
            seen[who].append(event.event_id)
            # Appending (not upserting) makes a second effect visible as a second event.
            uow.append("tally-all", [NewEvent("Counted", {"event_id": event.event_id})])

        return count

    first = await make_bus({"carts": {"ItemAdded": counting(0)}}, prefetch=8, lease=0.6,
                           partitions=4)
    second = await make_bus({"carts": {"ItemAdded": counting(1)}}, prefetch=8, lease=0.6,
                            partitions=4)

    async def shared() -> bool:
        return (len(first.owned_partitions("carts")), len(second.owned_partitions("carts"))) \
            == (2, 2)

    await eventually(shared)
    events = [item_added(f"sku-{i}") for i in range(200)]
    # Every event goes on the wire twice, as after a relay crash.
    await first.publish(events)
    await second.publish(events)

    await eventually(lambda: _stream_has(consumer_store, "tally-all", 200))
    partitions = [f"{amqp_namespace}.carts.p{n}" for n in range(4)]
    await eventually(lambda: _all_ready(amqp_url, partitions, 0))
    await first.stop(grace=5.0)
    await second.stop(grace=5.0)

    assert await _all_ready(amqp_url, partitions, 0), "messages were left over"
    tally = await consumer_store.read_stream("tally-all")
    assert sorted(e.payload["event_id"] for e in tally) == sorted(e.event_id for e in events)
    assert seen[0], "the first consumer got nothing"
    assert seen[1], "the second consumer got nothing"


async def _stream_has(store: SqliteEventStore, stream: str, n: int) -> bool:
    return await store.stream_version(stream) >= n


async def _ready(url: str, queue: str, n: int) -> bool:
    """Whether `queue` holds exactly `n` messages ready for delivery."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count == n


async def _all_ready(url: str, queues: list[str], n: int) -> bool:
    return all([await _ready(url, queue, n) for queue in queues])


async def test_delete_topology_removes_every_exchange_and_queue(
    make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    bus = await make_bus({"carts": {"ItemAdded": Recorder()},
                          "archive": {"ItemAdded": Recorder()}}, whole_log={"archive"})
    ns = amqp_namespace
    queues = [f"{ns}.carts.dlq", f"{ns}.archive.log", f"{ns}.archive.p0"] + [
        name for n in range(bus.partitions)
        for name in (f"{ns}.carts.p{n}", f"{ns}.carts.p{n}.retry.1", f"{ns}.carts.p{n}.retry.2")
    ]
    exchanges = [f"{ns}.events", f"{ns}.dlx", f"{ns}.log"]
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        for name in queues:
            await channel.declare_queue(name, passive=True)
        for name in exchanges:
            await channel.declare_exchange(name, passive=True)
        # Expired retries go back to the work queue: re-declaring with other arguments fails.
        retry_args: dict[str, Any] = {
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{ns}.carts.p0",
        }
        await channel.declare_queue(f"{ns}.carts.p0.retry.1", durable=True,
                                    arguments=retry_args)
        with pytest.raises(ChannelPreconditionFailed):
            await channel.declare_queue(f"{ns}.carts.p0.retry.1", durable=True)

    await bus.stop()
    await bus.delete_topology()

    async with await aio_pika.connect(amqp_url) as connection:
        for name in queues:
            with pytest.raises(ChannelNotFoundEntity):
                await (await connection.channel()).declare_queue(name, passive=True)
        for name in exchanges:
            with pytest.raises(ChannelNotFoundEntity):
                await (await connection.channel()).declare_exchange(name, passive=True)


async def test_start_raises_unavailable_when_the_broker_cannot_be_reached(
    consumer_store: SqliteEventStore,
) -> None:
    bus = RabbitMQBus(
        "amqp://guest:guest@127.0.0.1:1/", store=consumer_store, schemas=SCHEMAS, timeout=2.0
    )
    bus.subscribe("carts", {"ItemAdded": Recorder()})
    with pytest.raises(Unavailable):
        await bus.start()
    with pytest.raises(Unavailable):
        await bus.publish([item_added()])


async def test_the_bus_reconnects_by_itself_after_losing_the_broker(
    make_bus: MakeBus, amqp_url: str
) -> None:
    proxy = TcpProxy(URL(amqp_url))
    await proxy.start()
    got = Recorder()
    try:
        bus = await make_bus({"carts": {"ItemAdded": got}}, url=proxy.url(amqp_url), timeout=1.0)
        await bus.publish([item_added("before")])
        await got.wait_for(lambda: len(got.calls) == 1)

        await proxy.stop()
        with pytest.raises(Unavailable):
            await bus.publish([item_added("while down")])
        await proxy.start()

        after = item_added("after")
        await eventually(lambda: _published(bus, after))
        await got.wait_for(lambda: any(c.event_id == after.event_id for c in got.calls))
    finally:
        await proxy.stop()


async def test_partitions_a_tick_could_not_take_when_the_broker_went_away_are_taken_later(
    make_bus: MakeBus, consumer_store: SqliteEventStore, amqp_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker lost while a process takes its partitions one by one (RabbitMQ restarted
    while a service starts): those not taken yet, of that consumer and of the next ones,
    are taken at a later tick, not left leased to this process and consumed by nobody
    (a fresh-clone chaos run had sales stuck that way: their events waited in a queue)."""
    groups = [f"{amqp_namespace}.{name}" for name in ("carts", "orders")]
    # Another process's leases, about to expire: the partitions are taken at a tick.
    async with consumer_store.transaction() as uow:
        for group, p in itertools.product(groups, range(4)):
            uow.put_document(LEASES, f"{group}/{p}", {
                "group": group, "partition": p, "owner": "gone", "expires": time.time() + 1,
            })
    declared: dict[str, int] = {}

    async def broker_lost_at_carts_p1(channel: Any, name: str, arguments: Any = None) -> Any:
        declared[name] = declared.get(name, 0) + 1
        if name == f"{groups[0]}.p1" and declared[name] == 2:  # 1: the topology at start
            raise RuntimeError("Connection was not opened")
        return await declare_queue(channel, name, arguments)

    declare_queue = rabbitmq._declare_queue
    monkeypatch.setattr(rabbitmq, "_declare_queue", broker_lost_at_carts_p1)
    carts, orders = Recorder(), Recorder()
    bus = await make_bus({"carts": {"ItemAdded": carts}, "orders": {"ItemAdded": orders}},
                         partitions=4, lease=0.6)
    events = [item_added(f"sku-{n}") for n in range(40)]  # keys on every partition
    await bus.publish(events)

    await carts.wait_for(lambda: len(carts.calls) == len(events))
    await orders.wait_for(lambda: len(orders.calls) == len(events))
    assert declared[f"{groups[0]}.p1"] >= 3, "the fault was not played"
    assert bus.owned_partitions("carts") == bus.owned_partitions("orders") == [0, 1, 2, 3]


async def test_an_ack_that_never_completes_does_not_hold_up_the_next_messages_of_its_key(
    make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ack to a connection that died may never be written (aiormq queues the frame for a
    writer that is gone): the bus gives up on it after its timeout, and the next messages
    of that key are handled (a fresh-clone chaos run had a key's sales stuck behind one)."""
    real_ack = IncomingMessage.ack
    hung: list[str | None] = []

    async def ack(self: IncomingMessage, multiple: bool = False) -> None:
        if not hung:
            hung.append(self.message_id)
            await asyncio.Event().wait()  # never written
        await real_ack(self, multiple)

    monkeypatch.setattr(IncomingMessage, "ack", ack)
    got = Recorder()
    bus = await make_bus({"carts": {"ItemAdded": got}}, timeout=1.0)
    first, second = (dataclasses.replace(item_added(sku), metadata={KEY_FIELD: "customer-1"})
                     for sku in ("first", "second"))
    await bus.publish([first])
    await got.wait_for(lambda: len(got.calls) == 1)
    await bus.publish([second])

    await got.wait_for(lambda: any(c.event_id == second.event_id for c in got.calls))
    assert hung == [first.event_id]


async def _published(bus: RabbitMQBus, event: RecordedEvent) -> bool:
    try:
        await bus.publish([event])
    except Unavailable:
        return False
    return True


async def test_a_backlog_is_handled_many_messages_per_commit(
    make_bus: MakeBus, consumer_store: SqliteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy workers let messages gather; each worker then commits what gathered at once."""
    commits: list[int] = []
    original = consumer_store.commit

    async def counting(operations: Any) -> list[RecordedEvent]:
        if marks := sum(1 for op in operations if type(op).__name__ == "MarkProcessed"):
            commits.append(marks)  # not the partition leases' renewals
        return await original(operations)

    monkeypatch.setattr(consumer_store, "commit", counting)
    got = Recorder()
    first = asyncio.Event()

    async def slow_start(event: RecordedEvent, uow: UnitOfWork) -> None:
        if not first.is_set():  # the one worker is busy while the broker delivers more
            first.set()
            await asyncio.sleep(0.5)
        await got(event, uow)

    bus = await make_bus({"carts": {"ItemAdded": slow_start}}, workers=1, batch=50)
    events = [item_added(f"s{n}") for n in range(400)]
    await bus.publish(events)

    await eventually(lambda: _effects(consumer_store, 400))
    assert sorted(e.event_id for e in got.calls) == sorted(e.event_id for e in events)
    assert sum(commits) == 400
    assert commits[1] == 50  # what gathered behind the first commit, up to the batch size


async def _effects(store: SqliteEventStore, n: int) -> bool:
    return len(await store.find_documents("effects", limit=10_000)) >= n


async def test_each_partition_shows_its_owner_and_depth(make_bus: MakeBus) -> None:
    bus = await make_bus({"carts": {"ItemAdded": Recorder()}}, partitions=3)
    states = await bus.partition_states()
    assert [(s.consumer, s.partition, s.owner, s.depth) for s in states] == [
        ("carts", p, bus.member, 0) for p in range(3)]


async def test_a_running_bus_asks_for_its_partitions_on_one_kept_connection(
    make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler asks every few seconds: one handshake with the broker, not one a call;
    the connection closes with the bus."""
    bus = await make_bus({"carts": {"ItemAdded": Recorder()}}, partitions=2)
    opened: list[aio_pika.abc.AbstractConnection] = []
    connect = aio_pika.connect

    async def counted(*args: Any, **kwargs: Any) -> aio_pika.abc.AbstractConnection:
        opened.append(await connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(rabbitmq.aio_pika, "connect", counted)
    for _ in range(3):
        assert [s.depth for s in await bus.partition_states()] == [0, 0]
    assert len(opened) == 1 and not opened[0].is_closed
    # ... and on one channel, not one more per call (the broker caps a connection's).
    assert opened[0].transport is not None
    assert len(opened[0].transport.connection.channels) == 1
    await bus.stop()
    assert opened[0].is_closed
    assert [s.depth for s in await bus.partition_states()] == [0, 0]  # stopped: its own
    assert len(opened) == 2 and opened[1].is_closed


async def test_a_missing_partition_queue_shows_no_depth_and_the_others_still_show_theirs(
    make_bus: MakeBus, amqp_url: str
) -> None:
    """The broker closes the channel that asked for a missing queue: the queues after it
    are asked on another."""
    bus = await make_bus({"carts": {"ItemAdded": Recorder()}}, partitions=3)
    await bus.stop()  # its queues stay
    consumer = bus._consumers["carts"]
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(consumer.partition_queue(1))
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}"), routing_key=consumer.partition_queue(2))
    states = await bus.partition_states()
    assert [(s.partition, s.depth) for s in states] == [(0, 0), (1, None), (2, 1)]


async def test_a_consumer_of_the_whole_log_shows_the_batches_waiting_for_it(
    make_bus: MakeBus,
) -> None:
    bus = await make_bus({"archive": {"ItemAdded": Recorder()}}, whole_log={"archive"},
                         partitions=2)
    states = [(s.consumer, s.partition, s.owner, s.depth) for s in await bus.partition_states()]
    assert states == [("archive", 0, bus.member, 0), ("archive", 1, bus.member, 0),
                      ("archive", None, "1 process(es), one at a time", 0)]
    await bus.stop()  # its queue stays; nobody takes what is shipped meanwhile
    publisher = await make_bus({})
    await publisher.ship([item_added("a"), item_added("b")])
    await publisher.ship([item_added("c")])

    async def waiting() -> list[tuple[int | None, str | None, int | None]] | None:
        found = [(s.partition, s.owner, s.depth) for s in await bus.partition_states()]
        return found if found[-1][2] == 2 else None

    assert (await eventually(waiting))[-1] == (None, None, 2)  # batches, not events


async def test_changing_the_number_of_partitions_after_a_drain_loses_and_reorders_nothing(
    make_bus: MakeBus, consumer_store: SqliteEventStore
) -> None:
    """The documented procedure (README, "Changing N"): drain (every partition's depth
    0), stop, switch MAGASIN_PARTITIONS, resume."""
    handled = KeyedLog()
    before = await make_bus({"keys": {"ItemAdded": handled}}, partitions=4)
    await before.publish(await keyed_burst(consumer_store, keys=10, per_key=12))

    async def drained() -> bool:
        states = await before.partition_states()
        return len(states) == 4 and all(s.depth == 0 for s in states) and len(
            await consumer_store.find_documents("effects", limit=10_000)) == 120

    await eventually(drained)
    await before.stop()

    after = await make_bus({"keys": {"ItemAdded": handled}}, partitions=2)
    await after.publish(await keyed_burst(consumer_store, keys=10, per_key=12, first=12))
    await eventually(lambda: _effects(consumer_store, 240))
    await asyncio.sleep(0.2)
    assert await keyed_effects(consumer_store) == {
        f"customer-{k}": list(range(24)) for k in range(10)}
    assert len(await consumer_store.find_documents("effects", limit=10_000)) == 240


def with_baggage(event: RecordedEvent, **baggage: str) -> RecordedEvent:
    event.metadata = {**event.metadata, "baggage": baggage}
    return event


async def depths(bus: RabbitMQBus) -> dict[str, int]:
    """Messages waiting in each consumer's partition queues (nobody consuming them)."""
    found: dict[str, int] = {}
    for state in await bus.partition_states():
        found[state.consumer] = found.get(state.consumer, 0) + (state.depth or 0)
    return found


async def test_the_broker_sends_a_consumer_requiring_a_tag_only_the_events_carrying_it(
    make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    """Not a filter in the consumer: the queues of the consumer requiring `tier=gold` are
    never sent the others (counted in its queues while nobody consumes them), and the
    tags travel sorted after the partition in the routing key."""
    consumers = await make_bus({"gold": {"ItemAdded": Recorder()},
                                "every": {"ItemAdded": Recorder()}},
                               requires={"gold": "tier=gold"})
    await consumers.stop()  # its queues and bindings stay; nobody takes their messages
    publisher = await make_bus({})
    sent = [item_added("plain"), with_baggage(item_added("g1"), tier="gold"),
            with_baggage(item_added("silver"), tier="silver"),
            with_baggage(item_added("g2"), zone="eu", channel="web", tier="gold")]
    async with Tap(amqp_url, f"{amqp_namespace}.events", "#") as tap:
        await publisher.publish(sent)
        keys = sorted((m.routing_key or "") for m in await tap.take(4))

    assert await depths(consumers) == {"gold": 2, "every": 4}
    words = [key.split(".") for key in keys]
    assert all(w[:2] == ["cart", "ItemAdded"] and w[2].isdigit() for w in words)
    assert sorted(tuple(w[3:]) for w in words) == [
        (), ("channel=web", "tier=gold", "zone=eu"), ("tier=gold",), ("tier=silver",)]


async def test_queues_bound_before_a_consumer_required_a_tag_lose_their_other_bindings(
    make_bus: MakeBus, amqp_url: str, amqp_namespace: str
) -> None:
    """An upgrade: the queues of a consumer that took every event, bound as before routing
    tags (`*.<type>.<partition>`) and as an ordinary consumer now (`....#`), keep only the
    tagged binding once it requires a tag, so the broker stops sending it the others."""
    before = await make_bus({"gold": {"ItemAdded": Recorder()}})
    await before.stop()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        for partition in range(before.partitions):
            queue = await channel.get_queue(f"{amqp_namespace}.gold.p{partition}")
            await queue.bind(f"{amqp_namespace}.events", f"*.ItemAdded.{partition}")
    finally:
        await connection.close()
    after = await make_bus({"gold": {"ItemAdded": Recorder()}}, requires={"gold": "tier=gold"})
    await after.stop()

    publisher = await make_bus({})
    await publisher.publish([item_added("plain"), with_baggage(item_added("g"), tier="gold"),
                             with_baggage(item_added("s"), tier="silver")])
    assert await depths(after) == {"gold": 1}


async def test_a_consumer_that_requires_another_tag_or_none_is_rebound_accordingly(
    make_bus: MakeBus,
) -> None:
    gold = await make_bus({"c": {"ItemAdded": Recorder()}}, requires={"c": "tier=gold"})
    await gold.stop()
    silver = await make_bus({"c": {"ItemAdded": Recorder()}}, requires={"c": "tier=silver"})
    await silver.stop()
    publisher = await make_bus({})
    await publisher.publish([item_added("plain"), with_baggage(item_added("g"), tier="gold"),
                             with_baggage(item_added("s"), tier="silver")])
    assert await depths(silver) == {"c": 1}

    waiting = Recorder()
    every = await make_bus({"c": {"ItemAdded": waiting}})
    await waiting.wait_for(lambda: len(waiting.calls) == 1)  # the silver one, handled
    await every.stop()
    await publisher.publish([item_added("plain"), with_baggage(item_added("g"), tier="gold"),
                             with_baggage(item_added("s"), tier="silver")])
    assert await depths(every) == {"c": 3}


# -- consumers of the whole log ---------------------------------------------------------


def _deliveries(consumer: str, kind: str) -> float:
    from magasin.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value(
        "magasin_broker_deliveries_total",
        {"consumer": consumer, "service": consumer, "kind": kind}) or 0.0


async def test_a_consumer_of_the_whole_log_takes_a_shipped_batch_in_one_delivery_and_commit(
    make_bus: MakeBus,
) -> None:
    units: list[set[int]] = []  # the events each committed unit of work took
    taking: list[tuple[UnitOfWork, set[int]]] = []  # (kept alive: no unit takes another's id)

    async def archive(event: RecordedEvent, uow: UnitOfWork) -> None:
        took = next((t for u, t in taking if u is uow), None)
        if took is None:
            taking.append((uow, took := set()))
            uow.after_commit(lambda: units.append(took))
        took.add(event.global_position)

    bus = await make_bus({"archive": {"ItemAdded": archive}}, whole_log={"archive"})
    first, second = [item_added(f"a{n}") for n in range(5)], [item_added("b")]
    deliveries, events = _deliveries("archive", "log"), _deliveries("archive", "event")
    await bus.publish(first + second)  # what a relay publishes: none of it for the archive
    await bus.ship(first)
    await eventually(lambda: _true(len(units) == 1))
    await bus.ship(second)
    await eventually(lambda: _true(len(units) == 2))

    assert units == [{e.global_position for e in first}, {second[0].global_position}]
    assert _deliveries("archive", "log") - deliveries == 2
    assert _deliveries("archive", "event") == events, "no event came one by one"


async def _true(value: bool) -> bool:
    return value


async def test_a_consumer_that_takes_the_whole_log_now_loses_its_bindings_to_each_type(
    make_bus: MakeBus, amqp_url: str, amqp_namespace: str, consumer_store: SqliteEventStore,
) -> None:
    before = await make_bus({"archive": {"ItemAdded": Recorder()}})
    await before.stop()
    archive = Recorder()
    bus = await make_bus({"archive": {"ItemAdded": archive}}, whole_log={"archive"})
    event = item_added("once")
    await bus.publish([event])
    await asyncio.sleep(0.5)
    assert archive.calls == [], "an event reached the archive through a stale binding"
    await bus.ship([event])
    await archive.wait_for(lambda: len(archive.calls) == 1)


async def test_a_shipped_batch_that_cannot_be_read_is_dead_lettered_whole(
    make_bus: MakeBus, amqp_url: str, amqp_namespace: str,
) -> None:
    archive = Recorder()
    bus = await make_bus({"archive": {"ItemAdded": archive}}, whole_log={"archive"})
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(f"{amqp_namespace}.log")
        await exchange.publish(aio_pika.Message(b'[{"event_id": "x"}]'), routing_key="")
    good = item_added("good")
    await bus.ship([good])
    await archive.wait_for(lambda: len(archive.calls) == 1)
    (letter,) = await eventually(lambda: bus.dead_letters("archive"))
    assert letter.event is None and "invalid envelope" in letter.reason
    assert letter.body == '[{"event_id": "x"}]'
