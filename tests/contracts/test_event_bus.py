"""Contract of the event bus port, run against every adapter (in-process and RabbitMQ)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import ANY, Append, EventStore, UnitOfWork
from magasin.messaging.bus import DeadLetter, DeadLetterStatus, EventBus, Handler, RetryPolicy
from magasin.messaging.partitioning import configured_partitions, partition_of
from magasin.messaging.tags import tag
from magasin.observability.metrics import REGISTRY
from magasin.shared.errors import Conflict, NotFound
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.05, multiplier=2.0, jitter=0.0)
WAIT = 20.0


class ItemAdded(BaseModel):
    sku: str
    qty: int


class CartClosed(BaseModel):
    reason: str


SCHEMAS = EventSchemas()
SCHEMAS.register("ItemAdded", ItemAdded)
SCHEMAS.register("CartClosed", CartClosed)

MakeBus = Callable[..., Awaitable[EventBus]]


@pytest.fixture(params=["inprocess", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def bus_env(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[EventStore, MakeBus]]:
    """The consumer's store, and a factory of buses over it (started; stopped afterwards)."""
    store = SqliteEventStore(tmp_path / "bus.db")
    await store.open()
    made: list[EventBus] = []
    kind = request.param
    if kind == "rabbitmq":
        url = request.getfixturevalue("amqp_url")
        namespace = request.getfixturevalue("amqp_namespace")

    async def make(
        subscriptions: dict[str, dict[str, Handler]],
        retry: RetryPolicy = FAST_RETRY,
        start: bool = True,
        retries: dict[str, RetryPolicy] | None = None,
        concurrency: dict[str, int] | None = None,
        requires: dict[str, str] | None = None,
        whole_log: set[str] | None = None,
    ) -> EventBus:
        bus: EventBus
        if kind == "inprocess":
            from magasin.messaging.inprocess import InProcessBus

            bus = InProcessBus(store, SCHEMAS, retry=retry, poll_interval=0.05)
        else:
            from magasin.messaging.rabbitmq import RabbitMQBus

            bus = RabbitMQBus(url, store=store, schemas=SCHEMAS, namespace=namespace, retry=retry)
        for consumer, handlers in subscriptions.items():
            bus.subscribe(consumer, handlers, (retries or {}).get(consumer),
                          concurrency=(concurrency or {}).get(consumer),
                          requires=(requires or {}).get(consumer),
                          whole_log=consumer in (whole_log or set()))
        if not start:  # what a CLI holds: a bus to operate dead letters, not to consume
            return bus
        await bus.start()
        made.append(bus)
        return bus

    yield store, make
    for bus in made:
        await bus.stop(grace=0.5)
    if kind == "rabbitmq" and made:
        await made[-1].delete_topology()  # type: ignore[attr-defined]
    await store.close()


async def produce(store: EventStore, stream: str, *events: NewEvent) -> list[RecordedEvent]:
    """What a producing service does: append to its store; the result is what gets published."""
    return await store.append(stream, list(events))


def added(sku: str = "A", qty: int = 1) -> NewEvent:
    return NewEvent(type="ItemAdded", payload={"sku": sku, "qty": qty})


class Recorder:
    """A handler that records what it got and writes one document per event as its effect."""

    def __init__(self, fail_times: int = 0) -> None:
        self.calls: list[RecordedEvent] = []
        self.fail_times = fail_times
        self.changed = asyncio.Event()

    async def __call__(self, event: RecordedEvent, uow: UnitOfWork) -> None:
        self.calls.append(event)
        self.changed.set()
        if len([c for c in self.calls if c.event_id == event.event_id]) <= self.fail_times:
            raise RuntimeError(f"boom on {event.payload}")
        uow.put_document("effects", event.event_id, {"n": 1})

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.02)
        return result


async def effects(store: EventStore) -> list[str]:
    return [k for k, _ in await store.find_documents("effects", limit=10_000)]


async def test_a_subscriber_receives_published_events_of_its_types_only(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    items, closes = Recorder(), Recorder()
    bus = await make({"carts": {"ItemAdded": items}, "closer": {"CartClosed": closes}})

    batch = await produce(store, "cart-1", added("A"), added("B"))
    batch += await produce(store, "cart-1", NewEvent("CartClosed", {"reason": "paid"}))
    await bus.publish(batch)

    await items.wait_for(lambda: len(items.calls) == 2)
    await closes.wait_for(lambda: len(closes.calls) == 1)
    assert sorted(e.payload["sku"] for e in items.calls) == ["A", "B"]
    assert closes.calls[0].payload == {"reason": "paid"}
    assert closes.calls[0].routing_key == "cart.CartClosed"
    await asyncio.sleep(0.2)
    assert len(items.calls) == 2


async def test_the_envelope_arrives_intact(bus_env: tuple[EventStore, MakeBus]) -> None:
    store, make = bus_env
    got = Recorder()
    bus = await make({"carts": {"ItemAdded": got}})
    sent = NewEvent(
        type="ItemAdded", payload={"sku": "Z", "qty": 3}, correlation_id="tx-9",
        causation_id="c-1", traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        metadata={"service": "cart"},
    )
    (recorded,) = await produce(store, "cart-9", sent)
    await bus.publish([recorded])

    await got.wait_for(lambda: len(got.calls) == 1)
    assert got.calls[0] == recorded


async def test_every_consumer_gets_its_own_copy(bus_env: tuple[EventStore, MakeBus]) -> None:
    store, make = bus_env
    first, second = Recorder(), Recorder()
    bus = await make({"first": {"ItemAdded": first}, "second": {"ItemAdded": second}})
    await bus.publish(await produce(store, "cart-1", added()))

    await first.wait_for(lambda: len(first.calls) == 1)
    await second.wait_for(lambda: len(second.calls) == 1)


async def test_a_redelivered_event_has_one_effect(bus_env: tuple[EventStore, MakeBus]) -> None:
    store, make = bus_env
    got = Recorder()
    bus = await make({"carts": {"ItemAdded": got}})
    recorded = await produce(store, "cart-1", added())

    for _ in range(3):
        await bus.publish(recorded)
    await bus.publish(await produce(store, "cart-2", added("marker")))

    await eventually(lambda: _count(store, 2))
    await asyncio.sleep(0.2)
    assert len(await effects(store)) == 2
    assert await store.is_processed("carts", recorded[0].event_id)


async def _count(store: EventStore, n: int) -> bool:
    return len(await effects(store)) >= n


async def test_an_event_in_flight_when_the_consumer_dies_is_delivered_again_once(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    entered = asyncio.Event()

    async def hangs(event: RecordedEvent, uow: UnitOfWork) -> None:
        uow.put_document("effects", event.event_id, {"by": "first"})
        entered.set()
        await asyncio.Event().wait()  # the process "dies" before committing

    first = await make({"carts": {"ItemAdded": hangs}})
    recorded = await produce(store, "cart-1", added())
    await first.publish(recorded)
    await asyncio.wait_for(entered.wait(), WAIT)
    await first.stop(grace=0.05)
    assert await effects(store) == []

    got = Recorder()
    await make({"carts": {"ItemAdded": got}})
    await got.wait_for(lambda: len(got.calls) == 1)
    await eventually(lambda: _count(store, 1))
    assert await store.get_document("effects", recorded[0].event_id) == {"n": 1}


async def test_a_restarted_consumer_does_not_replay_what_it_handled(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    got = Recorder()
    first = await make({"carts": {"ItemAdded": got}})
    await first.publish(await produce(store, "cart-1", added("A"), added("B")))
    await got.wait_for(lambda: len(got.calls) == 2)
    await eventually(lambda: _count(store, 2))
    await first.stop()

    again = Recorder()
    second = await make({"carts": {"ItemAdded": again}})
    await second.publish(await produce(store, "cart-2", added("C")))
    await again.wait_for(lambda: len(again.calls) == 1)
    await asyncio.sleep(0.2)
    assert [e.payload["sku"] for e in again.calls] == ["C"]


async def test_a_failing_handler_is_retried_then_dead_lettered_with_the_reason(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    flaky, broken = Recorder(fail_times=2), Recorder(fail_times=99)
    bus = await make({"flaky": {"ItemAdded": flaky}, "broken": {"ItemAdded": broken}})
    (event,) = await produce(store, "cart-1", added("X"))
    await bus.publish([event])

    await flaky.wait_for(lambda: len(flaky.calls) == 3)
    letters = await eventually(lambda: bus.dead_letters("broken"))
    assert len(broken.calls) == 3
    (letter,) = letters
    assert letter.consumer == "broken"
    assert letter.attempts == 3
    assert "boom" in letter.reason and "RuntimeError" in letter.reason
    assert letter.event is not None and letter.event.event_id == event.event_id
    assert letter.routing_key == "cart.ItemAdded"
    assert await bus.dead_letters("flaky") == []
    # flaky's effect (its third call is seen as it starts, before its commit)
    assert await eventually(lambda: store.get_document("effects", event.event_id)) == {"n": 1}


async def test_retries_wait_with_backoff_and_do_not_block_later_events(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    slow_retry = RetryPolicy(attempts=2, initial_delay=0.6, jitter=0.0)
    first_try: dict[str, float] = {}
    order: list[str] = []
    loop = asyncio.get_running_loop()

    async def fails_once_on_a(event: RecordedEvent, uow: UnitOfWork) -> None:
        sku = event.payload["sku"]
        order.append(sku)
        if sku == "A" and "A" not in first_try:
            first_try["A"] = loop.time()
            raise RuntimeError("transient")
        uow.put_document("effects", event.event_id, {"at": loop.time()})

    bus = await make({"carts": {"ItemAdded": fails_once_on_a}}, retry=slow_retry)
    await bus.publish(await produce(store, "cart-1", added("A")))
    await eventually(lambda: _has(order, "A"))
    await bus.publish(await produce(store, "cart-2", added("B")))

    await eventually(lambda: _count(store, 2))
    assert order == ["A", "B", "A"], "B was held up behind A's retry"
    retried_after = loop.time() - first_try["A"]
    assert retried_after >= 0.5


async def _has(items: list[str], item: str) -> bool:
    return item in items


async def test_an_invalid_payload_is_dead_lettered_at_once_and_the_consumer_goes_on(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    got = Recorder()
    bus = await make({"carts": {"ItemAdded": got}})
    bad = await produce(store, "cart-1", NewEvent("ItemAdded", {"sku": "A", "qty": "many"}))
    await bus.publish(bad)
    await bus.publish(await produce(store, "cart-2", added("good")))

    await got.wait_for(lambda: len(got.calls) == 1)
    assert got.calls[0].payload["sku"] == "good"
    (letter,) = await eventually(lambda: bus.dead_letters("carts"))
    assert letter.attempts == 1
    assert "invalid payload" in letter.reason and "qty" in letter.reason
    assert letter.event is not None and letter.event.event_id == bad[0].event_id


def test_subscribing_to_an_unregistered_type_is_refused(tmp_path: Path) -> None:
    from magasin.messaging.inprocess import InProcessBus

    bus = InProcessBus(SqliteEventStore(tmp_path / "x.db"), SCHEMAS)
    with pytest.raises(ValueError, match="unregistered"):
        bus.subscribe("carts", {"Nonsense": Recorder()})


# -- operating dead letters ----------------------------------------------------------------


class Fixable:
    """A handler that fails while `broken` (a bug, a missing reference) and counts calls."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.broken = True
        self.calls: list[RecordedEvent] = []

    async def __call__(self, event: RecordedEvent, uow: UnitOfWork) -> None:
        self.calls.append(event)
        if self.broken:
            raise RuntimeError(f"cannot handle {event.payload['sku']}")
        uow.put_document("effects", f"{self.consumer}:{event.event_id}", {"n": 1})

    def handled(self, event_id: str) -> int:
        return sum(1 for e in self.calls if e.event_id == event_id)


async def dead_lettered(bus: EventBus, consumer: str, n: int = 1) -> list[DeadLetter]:
    async def enough() -> list[DeadLetter] | None:
        letters = await bus.dead_letters(consumer)
        return letters if len(letters) >= n else None

    letters: list[DeadLetter] = await eventually(enough)
    return letters


async def effect_of(store: EventStore, consumer: str, event_id: str) -> bool:
    return await store.get_document("effects", f"{consumer}:{event_id}") is not None


async def test_a_requeued_dead_letter_goes_to_its_consumer_only_and_takes_effect_once(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    broken, healthy = Fixable("broken"), Fixable("healthy")
    healthy.broken = False
    bus = await make({"broken": {"ItemAdded": broken}, "healthy": {"ItemAdded": healthy}})
    (event,) = await produce(store, "cart-1", added("X"))
    await bus.publish([event])
    (letter,) = await dead_lettered(bus, "broken")
    assert broken.handled(event.event_id) == FAST_RETRY.attempts

    broken.broken = False  # the fix
    requeued = await bus.requeue_dead_letter(letter.id)
    assert requeued.status is DeadLetterStatus.REQUEUED
    with pytest.raises(Conflict, match="requeued already"):
        await bus.requeue_dead_letter(letter.id)

    await eventually(lambda: effect_of(store, "broken", event.event_id))
    await asyncio.sleep(0.3)
    assert broken.handled(event.event_id) == FAST_RETRY.attempts + 1
    assert healthy.handled(event.event_id) == 1, "the other consumer got it again"
    assert await bus.dead_letters("broken") == []
    assert (await bus.dead_letter(letter.id)).status is DeadLetterStatus.REQUEUED


async def test_two_requeues_at_once_deliver_the_message_once(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    broken = Fixable("broken")
    bus = await make({"broken": {"ItemAdded": broken}})
    (event,) = await produce(store, "cart-1", added("X"))
    await bus.publish([event])
    (letter,) = await dead_lettered(bus, "broken")
    broken.broken = False

    outcomes = await asyncio.gather(
        bus.requeue_dead_letter(letter.id), bus.requeue_dead_letter(letter.id),
        return_exceptions=True,
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "DeadLetter"]
    await eventually(lambda: effect_of(store, "broken", event.event_id))
    await asyncio.sleep(0.3)
    assert broken.handled(event.event_id) == FAST_RETRY.attempts + 1


async def test_a_requeued_letter_that_fails_again_is_dead_lettered_again(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    broken = Fixable("broken")
    bus = await make({"broken": {"ItemAdded": broken}})
    (event,) = await produce(store, "cart-1", added("X"))
    await bus.publish([event])
    (letter,) = await dead_lettered(bus, "broken")

    await bus.requeue_dead_letter(letter.id)  # without a fix
    (again,) = await dead_lettered(bus, "broken")
    assert again.id == letter.id and again.status is DeadLetterStatus.PENDING
    assert again.attempts == FAST_RETRY.attempts, "a requeue gets a fresh retry budget"
    assert broken.handled(event.event_id) == 2 * FAST_RETRY.attempts

    broken.broken = False
    await bus.requeue_dead_letter(again.id)
    await eventually(lambda: effect_of(store, "broken", event.event_id))


async def test_a_bus_that_is_not_started_requeues_for_the_running_one(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    broken = Fixable("broken")
    running = await make({"broken": {"ItemAdded": broken}})
    (event,) = await produce(store, "cart-1", added("X"))
    await running.publish([event])
    (letter,) = await dead_lettered(running, "broken")
    broken.broken = False

    operator = await make({"broken": {"ItemAdded": Fixable("unused")}}, start=False)
    await operator.requeue_dead_letter(letter.id)
    await eventually(lambda: effect_of(store, "broken", event.event_id))
    assert broken.handled(event.event_id) == FAST_RETRY.attempts + 1


async def test_bulk_requeue_takes_every_pending_letter_of_one_consumer(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    broken, other = Fixable("broken"), Fixable("other")
    bus = await make({"broken": {"ItemAdded": broken}, "other": {"ItemAdded": other}})
    events = await produce(store, "cart-1", added("A"), added("B"))
    await bus.publish(events)
    await dead_lettered(bus, "broken", 2)
    await dead_lettered(bus, "other", 2)
    broken.broken = False

    requeued = await bus.requeue_dead_letters("broken")
    assert len(requeued) == 2
    for event in events:
        await eventually(lambda e=event: effect_of(store, "broken", e.event_id))
    assert await bus.dead_letters("broken") == []
    assert len(await bus.dead_letters("other")) == 2
    assert await bus.requeue_dead_letters("broken") == []


async def test_an_archived_letter_is_kept_but_no_longer_listed_by_default(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    bus = await make({"broken": {"ItemAdded": Fixable("broken")}})
    await bus.publish(await produce(store, "cart-1", added("X")))
    (letter,) = await dead_lettered(bus, "broken")

    archived = await bus.archive_dead_letter(letter.id)
    assert archived.status is DeadLetterStatus.ARCHIVED
    assert await bus.dead_letters() == []
    assert [x.id for x in await bus.dead_letters(status=DeadLetterStatus.ARCHIVED)] == [letter.id]
    kept = await bus.dead_letter(letter.id)
    assert (kept.status, kept.reason, kept.body) == (
        DeadLetterStatus.ARCHIVED, letter.reason, letter.body
    )


async def test_dead_letters_are_listed_by_consumer_type_and_part_of_the_reason(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env

    async def refuses_closing(event: RecordedEvent, uow: UnitOfWork) -> None:
        raise PermissionError("store closed for inventory")

    bus = await make({
        "broken": {"ItemAdded": Fixable("broken"), "CartClosed": refuses_closing},
        "other": {"ItemAdded": Fixable("other")},
    })
    await bus.publish(await produce(
        store, "cart-1", added("X"), NewEvent("CartClosed", {"reason": "paid"})
    ))
    await dead_lettered(bus, "broken", 2)
    await dead_lettered(bus, "other", 1)

    assert len(await bus.dead_letters()) == 3
    assert {x.type for x in await bus.dead_letters("broken")} == {"ItemAdded", "CartClosed"}
    assert {x.consumer for x in await bus.dead_letters(type="ItemAdded")} == {"broken", "other"}
    (closed,) = await bus.dead_letters(reason="STORE CLOSED")
    assert (closed.consumer, closed.type) == ("broken", "CartClosed")
    assert await bus.dead_letters("other", type="CartClosed") == []


async def test_an_unknown_dead_letter_is_not_found(bus_env: tuple[EventStore, MakeBus]) -> None:
    _, make = bus_env
    bus = await make({"broken": {"ItemAdded": Fixable("broken")}})
    for operation in (bus.dead_letter, bus.requeue_dead_letter, bus.archive_dead_letter):
        with pytest.raises(NotFound):
            await operation("broken:nothing-like-this")


async def test_a_consumer_can_have_a_retry_policy_of_its_own(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    patient, hasty = Fixable("patient"), Fixable("hasty")
    longer = RetryPolicy(attempts=5, initial_delay=0.02, multiplier=1.5, jitter=0.0)
    bus = await make(
        {"patient": {"ItemAdded": patient}, "hasty": {"ItemAdded": hasty}},
        retries={"patient": longer},
    )
    await bus.publish(await produce(store, "cart-1", added("X")))
    (slow,) = await dead_lettered(bus, "patient")
    (fast,) = await dead_lettered(bus, "hasty")
    assert (slow.attempts, fast.attempts) == (5, FAST_RETRY.attempts)
    assert (len(patient.calls), len(hasty.calls)) == (5, FAST_RETRY.attempts)


async def test_dead_lettering_counts_in_the_alert_metric_and_logs_one_error_line(
    bus_env: tuple[EventStore, MakeBus], caplog: pytest.LogCaptureFixture
) -> None:
    store, make = bus_env
    labels = {"consumer": "alerting", "reason_kind": "RuntimeError"}

    def counted() -> float:
        return REGISTRY.get_sample_value("magasin_dead_letters_total", labels) or 0.0

    before = counted()
    bus = await make({"alerting": {"ItemAdded": Fixable("alerting")}})
    with caplog.at_level(logging.ERROR, logger="magasin.messaging.deadletters"):
        await bus.publish(await produce(store, "cart-1", added("X")))
        await dead_lettered(bus, "alerting")

        async def alerted() -> bool:
            return counted() == before + 1

        await eventually(alerted)
    lines = [r.getMessage() for r in caplog.records
             if r.name == "magasin.messaging.deadletters" and r.levelno == logging.ERROR]
    assert len(lines) == 1
    assert "alerting" in lines[0] and "RuntimeError: cannot handle X" in lines[0]


async def test_a_burst_with_one_poisoned_event_takes_every_other_effect_once(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    """Under load the adapters handle many events per unit of work; one failing event
    must neither take the others down with it nor give any of them a second effect."""
    store, make = bus_env
    calls: dict[str, int] = {}

    async def handler(event: RecordedEvent, uow: UnitOfWork) -> None:
        calls[event.payload["sku"]] = calls.get(event.payload["sku"], 0) + 1
        if event.payload["sku"] == "bad":
            raise RuntimeError("poisoned")
        uow.put_document("effects", event.event_id, {"sku": event.payload["sku"]})

    bus = await make({"carts": {"ItemAdded": handler}})
    burst: list[RecordedEvent] = []
    for n in range(300):
        burst += await produce(store, f"cart-{n}", added("bad" if n == 150 else f"s{n}"))
    await bus.publish(burst)

    await eventually(lambda: _count(store, 299))
    (letter,) = await eventually(lambda: bus.dead_letters("carts"))
    assert letter.event is not None and letter.event.payload["sku"] == "bad"
    await asyncio.sleep(0.2)
    assert len(await effects(store)) == 299
    assert all(await asyncio.gather(*(store.is_processed("carts", e.event_id)
                                      for e in burst if e.payload["sku"] != "bad")))
    # Its own attempts are counted; a batch it brought down (rolled back, no effect) is not.
    assert letter.attempts == FAST_RETRY.attempts <= calls["bad"]


async def test_a_consumer_with_concurrency_does_not_wait_for_one_slow_call_to_start_the_next(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    """A consumer whose handler waits on an outside system (a bank) handles several events
    at once, each with its own effect and inbox mark; a failure among them is retried."""
    store, make = bus_env
    in_flight, most, calls = 0, 0, 0

    async def bank_call(event: RecordedEvent, uow: UnitOfWork) -> None:
        nonlocal in_flight, most, calls
        calls += 1
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.2)
        finally:
            in_flight -= 1
        if event.payload["sku"] == "flaky" and calls < 12:
            raise RuntimeError("bank hiccup")
        uow.put_document("effects", event.event_id, {"sku": event.payload["sku"]})

    bus = await make({"slow": {"ItemAdded": bank_call}}, concurrency={"slow": 8})
    # One commit: the consumer sees the ten at once (whatever lanes they fall in).
    burst = await store.commit([
        Append(f"cart-{n}", (added("flaky" if n == 3 else f"s{n}"),), ANY) for n in range(10)
    ])
    await bus.publish(burst)

    await eventually(lambda: _count(store, 10))
    assert most == 8  # never more than asked, and not one 0.2 s call after another
    assert all(await asyncio.gather(*(store.is_processed("slow", e.event_id) for e in burst)))


class KeyedLog:
    """A handler whose effect is, per partition key, the list of the sequence numbers it
    handled, in the order their units of work committed: a key's list is 0, 1, 2... when
    its events took effect once each in publish order (a duplicate, a gap, a swap shows)."""

    async def __call__(self, event: RecordedEvent, uow: UnitOfWork) -> None:
        await asyncio.sleep(random.uniform(0, 0.002))  # let concurrent handlers interleave
        key, seq = event.metadata["partition_key"], event.payload["qty"]
        seen = await uow.get_document("keys", key) or {"seen": []}
        uow.put_document("keys", key, {"seen": [*seen["seen"], seq]})
        uow.put_document("effects", event.event_id, {"key": key, "seq": seq})


async def keyed_effects(store: EventStore) -> dict[str, list[int]]:
    return {key: doc["seen"] for key, doc in await store.find_documents("keys", limit=10_000)}


async def keyed_burst(
    store: EventStore, keys: int, per_key: int, first: int = 0
) -> list[RecordedEvent]:
    """per_key events of each key, interleaved, each in a stream of its own (so only the
    key can keep them in order), stored in small commits as services would."""
    sent: list[RecordedEvent] = []
    order = [(k, n) for n in range(first, first + per_key) for k in range(keys)]
    for start in range(0, len(order), 7):
        sent += await store.commit([
            Append(f"cart-{k}-{n}", (NewEvent("ItemAdded", {"sku": f"k{k}", "qty": n},
                                              metadata={"partition_key": f"customer-{k}"}),),
                   ANY)
            for k, n in order[start:start + 7]
        ])
    return sent


async def test_each_keys_events_are_handled_once_in_publish_order(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    handled = KeyedLog()
    bus = await make({"carts": {"ItemAdded": handled}})
    burst = await keyed_burst(store, keys=20, per_key=15)
    for start in range(0, len(burst), 50):
        await bus.publish(burst[start:start + 50])

    await eventually(lambda: _count(store, len(burst)))
    await asyncio.sleep(0.2)
    assert await keyed_effects(store) == {f"customer-{k}": list(range(15)) for k in range(20)}


async def test_a_consumer_stopped_mid_burst_resumes_each_key_in_order_once(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    """Stopped while handling (a deploy), restarted, and the burst published again (an
    outbox repeating itself): every key's events still take effect once each, in order."""
    store, make = bus_env
    handled = KeyedLog()
    first = await make({"carts": {"ItemAdded": handled}})
    burst = await keyed_burst(store, keys=12, per_key=25)
    await first.publish(burst)
    await eventually(lambda: _count(store, 60))
    await first.stop(grace=0.01)

    second = await make({"carts": {"ItemAdded": handled}})
    await second.publish(burst)
    await eventually(lambda: _count(store, len(burst)))
    await asyncio.sleep(0.2)
    assert await keyed_effects(store) == {f"customer-{k}": list(range(25)) for k in range(12)}


async def test_a_slow_key_does_not_hold_up_keys_of_other_partitions(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    """Partitions are handled concurrently: the first key's handler waits for an event of
    a key in another partition, published after it, to be handled."""
    store, make = bus_env
    slow, fast = "customer-0", next(
        f"customer-{n}" for n in range(1, 100)
        if partition_of(f"customer-{n}", configured_partitions())
        != partition_of("customer-0", configured_partitions())
    )
    other_done = asyncio.Event()
    held_up: list[str] = []

    async def handler(event: RecordedEvent, uow: UnitOfWork) -> None:
        if event.metadata["partition_key"] == slow:
            try:
                await asyncio.wait_for(other_done.wait(), 3.0)
            except TimeoutError:
                held_up.append(event.event_id)
                raise
        else:
            other_done.set()
        uow.put_document("effects", event.event_id, {})

    bus = await make({"carts": {"ItemAdded": handler}})
    for key in (slow, fast):
        await bus.publish(await produce(store, f"cart-{key}", NewEvent(
            "ItemAdded", {"sku": "A", "qty": 1}, metadata={"partition_key": key})))
    await eventually(lambda: _count(store, 2))
    assert held_up == []


def tagged(sku: str, **baggage: str) -> NewEvent:
    """An ItemAdded of the key `customer-1` whose flow carries `baggage` (its routing tags)."""
    return NewEvent("ItemAdded", {"sku": sku, "qty": 1},
                    metadata={"partition_key": "customer-1", "baggage": baggage})


async def test_a_consumer_requiring_a_tag_gets_only_the_events_that_carry_it(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    """Untagged and otherwise tagged events never reach it (no handler run, no inbox mark),
    while an ordinary consumer gets every event, tagged or not. All of one key: had the
    others been dispatched to it, they would have been before the last one, in order."""
    store, make = bus_env
    gold, every = Recorder(), Recorder()
    bus = await make({"gold": {"ItemAdded": gold}, "every": {"ItemAdded": every}},
                     requires={"gold": tag("tier", "gold")})
    sent = await store.commit([Append(f"cart-{n}", (event,), ANY) for n, event in enumerate([
        tagged("plain"),
        tagged("g1", tier="gold"),
        tagged("silver", tier="silver"),
        tagged("other", channel="web"),
        tagged("g2", channel="web", tier="gold"),  # another tag, sorted before its own
        tagged("plain-2"),
    ])])
    sent += await produce(store, "cart-last", tagged("g3", tier="gold", zone="eu"))
    await bus.publish(sent)

    await every.wait_for(lambda: len(every.calls) == len(sent))
    await gold.wait_for(lambda: any(e.payload["sku"] == "g3" for e in gold.calls))
    assert [e.payload["sku"] for e in gold.calls] == ["g1", "g2", "g3"]
    not_gold = [e for e in sent if e.payload["sku"] not in ("g1", "g2", "g3")]
    for event in not_gold:
        assert not await store.is_processed("gold", event.event_id)
        assert await store.is_processed("every", event.event_id)


def test_a_required_tag_must_be_one_routing_key_word(tmp_path: Path) -> None:
    from magasin.messaging.inprocess import InProcessBus

    bus = InProcessBus(SqliteEventStore(tmp_path / "bus.db"), SCHEMAS)
    for word in ("tier=gold.plus", "*", "#", "", "tier gold"):
        with pytest.raises(ValueError, match="routing tag"):
            bus.subscribe(f"c-{len(word)}", {"ItemAdded": Recorder()}, requires=word)


async def test_a_tagged_event_is_retried_and_dead_lettered_like_any_other(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    """Retries come back to the consumer requiring the tag (RabbitMQ: through its retry
    queues, not the exchange); the letter names the event's routing key without the
    partition and the tags."""
    store, make = bus_env
    flaky, broken = Recorder(fail_times=2), Recorder(fail_times=99)
    bus = await make({"flaky": {"ItemAdded": flaky}, "broken": {"ItemAdded": broken}},
                     requires={"flaky": "tier=gold", "broken": "tier=gold"})
    (event,) = await produce(store, "cart-1", tagged("X", tier="gold", zone="eu"))
    await bus.publish([event])

    await flaky.wait_for(lambda: len(flaky.calls) == 3)
    (letter,) = await eventually(lambda: bus.dead_letters("broken"))
    assert (letter.attempts, letter.routing_key) == (3, "cart.ItemAdded")
    assert letter.event is not None and letter.event.event_id == event.event_id
    assert await eventually(lambda: store.get_document("effects", event.event_id)) == {"n": 1}


# -- consumers of the whole log ---------------------------------------------------------


async def test_a_consumer_of_the_whole_log_takes_every_shipped_event_once(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    committed: list[RecordedEvent] = []

    async def archive(event: RecordedEvent, uow: UnitOfWork) -> None:
        uow.after_commit(lambda: committed.append(event))

    per_type = Recorder()
    bus = await make({"archive": {"ItemAdded": archive, "CartClosed": archive},
                      "carts": {"ItemAdded": per_type}}, whole_log={"archive"})
    events = [*await produce(store, "cart-1", added("A"), added("B")),
              *await produce(store, "cart-2", added("C"),
                             NewEvent("CartClosed", {"reason": "paid"}))]
    await bus.publish(events)
    await bus.ship(events)
    await bus.ship(events[:2])  # shipped again (a relay died before marking it shipped)

    await per_type.wait_for(lambda: len(per_type.calls) == 3)
    await eventually(lambda: _true(len(committed) >= 4))
    await asyncio.sleep(0.3)
    assert sorted(e.event_id for e in committed) == sorted(e.event_id for e in events)
    assert [e.payload.get("sku") for e in committed if e.stream_id == "cart-1"] == ["A", "B"]


async def _true(value: bool) -> bool:
    return value


async def test_an_event_of_a_shipped_batch_that_fails_is_retried_and_dead_lettered_alone(
    bus_env: tuple[EventStore, MakeBus],
) -> None:
    store, make = bus_env
    broken: set[str] = {"bad"}
    calls: list[str] = []

    async def archive(event: RecordedEvent, uow: UnitOfWork) -> None:
        calls.append(event.payload["sku"])
        if event.payload["sku"] in broken:
            raise RuntimeError("cannot archive it")
        uow.put_document("effects", event.event_id, {"sku": event.payload["sku"]})

    bus = await make({"archive": {"ItemAdded": archive}}, whole_log={"archive"})
    events = [*await produce(store, "cart-1", added("a1"), added("a2")),
              *await produce(store, "cart-2", added("bad")),
              *await produce(store, "cart-3", added("c1"))]
    invalid = await produce(store, "cart-4", NewEvent("ItemAdded", {"sku": "x", "qty": "?"}))
    await bus.publish(events + invalid)
    await bus.ship(events + invalid)

    letters = await eventually(lambda: _letters(bus, "archive", 2))
    by_sku = {(letter.event.payload["sku"] if letter.event else None): letter
              for letter in letters}
    assert by_sku["bad"].attempts == FAST_RETRY.attempts
    assert "cannot archive it" in by_sku["bad"].reason
    assert by_sku["x"].attempts == 1 and "invalid payload" in by_sku["x"].reason
    assert sorted(doc["sku"] for _, doc in await store.find_documents("effects")) == [
        "a1", "a2", "c1"]
    assert calls.count("bad") >= FAST_RETRY.attempts

    broken.clear()  # the fix; the requeued event then takes effect once
    await bus.requeue_dead_letter(by_sku["bad"].id)
    await eventually(lambda: _count(store, 4))
    await asyncio.sleep(0.2)
    assert sorted(doc["sku"] for _, doc in await store.find_documents("effects")) == [
        "a1", "a2", "bad", "c1"]


async def _letters(bus: EventBus, consumer: str, n: int) -> list[DeadLetter] | None:
    letters = await bus.dead_letters(consumer)
    return letters if len(letters) >= n else None
