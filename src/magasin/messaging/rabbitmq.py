"""RabbitMQ adapter of the event bus: topic exchange, per-consumer partitioned work queues,
retry and dead-letter queues; partitions shared between a service's processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
    HeadersType,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.messaging import deadletters
from magasin.messaging.bus import DeadLetter, EventBus, Handler, PartitionState, RetryPolicy
from magasin.messaging.dispatch import Outcome, Result, check_handlers, deliver, deliver_batch
from magasin.messaging.ownership import (
    DEFAULT_LEASE,
    Ownership,
    leases,
    new_member_id,
    plan_all,
)
from magasin.messaging.partitioning import (
    configured_partitions,
    event_partition,
    key_of,
    stable_hash,
)
from magasin.messaging.tags import (
    binding_key,
    carries,
    check_tag,
    routed,
    routing_key,
    tags_of,
    untagged_binding_key,
)
from magasin.observability import metrics, tracing
from magasin.shared.clock import utcnow
from magasin.shared.errors import (
    ConfigurationError,
    MagasinError,
    MalformedMessage,
    Unavailable,
)
from magasin.shared.messages import (
    EventSchemas,
    RecordedEvent,
    decode_envelope,
    decode_envelopes,
    encode_envelopes,
)

log = logging.getLogger("magasin.messaging.rabbitmq")

ATTEMPTS = "x-magasin-attempts"
REASON = "x-magasin-reason"
CONSUMER = "x-magasin-consumer"
ORIGINAL_ROUTING_KEY = "x-magasin-original-routing-key"
DEAD_LETTERED_AT = "x-magasin-dead-lettered-at"
KEY_HEADER = "magasin-partition-key"
BINDINGS = "bus.bindings"
"""One document per consumer (by queue group): the binding scheme and the routing tag its
queues were last bound for, so that a start removes stale bindings only after a change."""
SCHEME = 2
"""1: `*.<type>.<i>` (before routing tags); 2: `*.<type>.<i>.#[.<tag>.#]`."""

_BROKER_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)
_MAX_REASON = 2000  # a header must fit in one AMQP frame; reasons are for humans anyway
_REQUEUE_PAUSE = 1.0  # seconds before handing back a message we could not settle

Work = Callable[["_Consumer", AbstractIncomingMessage], Awaitable[None]]
Copy = Callable[[dict[str, Any], float | None], aio_pika.Message]
"""Makes the message that sets a failure aside, from its headers and expiration (s)."""
_LOG_PREFETCH = 32
"""Shipped batches a consumer of the whole log may hold unacked: what one commit takes."""
_LOG_GATHER = 0.02
"""Seconds a consumer of the whole log waits after a batch for those the other relays
shipped at the same moment (see OutboxRelay), to commit them all at once."""
Slot = tuple[int, str]
"""(partition, key): the messages of one key are handled one at a time, in order."""


def check_queue_arguments(queue: str, arguments: Mapping[str, Any] | None) -> None:
    """Refuse a queue that would drop messages: past `x-delivery-limit` the broker discards a
    message unless the queue names a dead-letter exchange to send it to."""
    arguments = arguments or {}
    if "x-delivery-limit" in arguments and "x-dead-letter-exchange" not in arguments:
        raise ConfigurationError(
            f"queue {queue!r} has a delivery limit ({arguments['x-delivery-limit']}) but no "
            "x-dead-letter-exchange: messages past the limit would be lost"
        )


@dataclass
class _Consumer:
    name: str
    handlers: dict[str, Handler]
    queue: str
    """The group's name: its partition queues are `<queue>.p<n>`."""
    retry: RetryPolicy
    workers: int
    """Most messages (of distinct keys) the process handles at once."""
    batch: int
    """Most messages one task handles in one unit of work."""
    whole_log: bool = False
    """It gets every event in the batches the publishers ship, from `<queue>.log`; its
    partition queues are bound to nothing and get only its retries and requeues."""
    partitions: int = 1
    tags: list[tuple[AbstractQueue, str]] = field(default_factory=list)
    """Consumers of the dead-letter queue (every process records dead letters)."""
    queues: dict[int, AbstractQueue] = field(default_factory=dict)
    consuming: dict[int, tuple[AbstractChannel, AbstractQueue, str]] = field(
        default_factory=dict)
    """Partition -> (its own channel, queue, consumer tag), for the partitions this
    process owns. Giving one up closes its channel: the broker takes back at once every
    message it had sent there and not been acked, even those still on the wire."""
    waiting: dict[Slot, deque[AbstractIncomingMessage]] = field(default_factory=dict)
    """Messages taken from the broker that no worker has handled yet, per key slot."""
    shipped: deque[AbstractIncomingMessage] = field(default_factory=deque)
    """Shipped batches taken from `<queue>.log` and not handled yet (whole_log)."""
    shipping: bool = False
    """Whether a task is handling `shipped`."""
    running: set[Slot] = field(default_factory=set)
    draining: set[int] = field(default_factory=set)
    ownership: Ownership | None = None
    slots: asyncio.Semaphore = field(default_factory=asyncio.Semaphore)
    """`workers` of them, shared by the partitions: the process's handlers at once."""
    requires: str | None = None
    """The routing tag its queues are bound for (see `tags`): the broker sends it only
    the events that carry it."""

    def partition_queue(self, partition: int) -> str:
        return f"{self.queue}.p{partition}"

    def retry_queue(self, partition: int, level: int) -> str:
        return f"{self.partition_queue(partition)}.retry.{level}"

    def idle(self, partition: int) -> bool:
        return not any(slot[0] == partition for slot in self.running)

    def retry_level(self, failed: int) -> int:
        """Retries past the first delays all wait `max_delay`: they share the last queue."""
        return min(failed, self.retry.levels)

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dlq"

    @property
    def log_queue(self) -> str:
        return f"{self.queue}.log"


class RabbitMQBus(EventBus):
    """Event bus over RabbitMQ (distributed mode).

    Events go to the durable topic exchange `<ns>.events` with routing key
    `<aggregate>.<EventType>.<partition>[.<tag>...]`: the publisher computes the partition,
    `stable_hash(key) % N` (`partitioning`), the same number the in-process lanes and the
    event's metadata use, and appends the event's routing tags, sorted (`tags`). Each
    consumer has N durable work queues `<ns>.<consumer>.p<i>` (`x-single-active-consumer`),
    each bound to its partition's routing keys, `*.<EventType>.<i>.#` (any tags), or
    `*.<EventType>.<i>.#.<tag>.#` for a consumer that requires a tag; the processes
    of a service share them through leases (`ownership`): one process consumes a partition
    at a time, and within it one key's messages are handled one at a time, in order.
    A failed message is acked only once a copy sits in `<partition queue>.retry.<n>`, a
    queue nobody consumes whose messages expire (per-message TTL) back into the partition
    queue, so a retry never holds up the messages behind it (nor, thus, later events of
    its key). A message given up on goes through the
    direct exchange `<ns>.dlx` to `<ns>.<consumer>.dlq`, which the bus itself drains into
    the store's dead letters. A requeued dead letter is published straight into its
    consumer's work queue (the default exchange), without an attempt count.

    A consumer of the whole log (`whole_log`: the audit, the archive) gets its events from
    the relays instead: each ships, every `MAGASIN_ARCHIVE_LINGER_S`, the events it
    published meanwhile as one message (a JSON array of envelopes) to the fanout exchange
    `<ns>.log`, bound to the consumer's `<ns>.<consumer>.log` (`x-single-active-consumer`).
    One task takes every batch waiting and commits their events in one unit of work, each
    with its inbox mark; an event that fails goes alone to its partition's retry queue, and
    from there is retried and dead-lettered like any other. Its partition queues are bound
    to nothing: they get only those retries and requeued dead letters.
    """

    def __init__(
        self,
        url: str,
        *,
        store: EventStore,
        schemas: EventSchemas,
        namespace: str = "magasin",
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so sharing it is safe
        prefetch: int = 64,
        workers: int = 64,
        batch: int = 1,
        timeout: float = 10.0,
        work_queue_arguments: Mapping[str, Any] | None = None,
        partitions: int | None = None,
        lease: float = DEFAULT_LEASE,
        member: str | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        if workers < 1 or batch < 1:
            raise ValueError("workers and batch must be >= 1")
        self.work_queue_arguments = dict(work_queue_arguments or {})
        """Extra arguments of every work queue (say a quorum queue with a delivery limit
        and the dead-letter exchange); checked by `check_queue_arguments` at start."""
        self.url = url
        self.store = store
        self.schemas = schemas
        self.namespace = namespace
        self.retry = retry
        self.prefetch = prefetch
        self.workers = workers
        """Tasks handling one consumer's messages at once (unless it says otherwise)."""
        self.batch = batch
        """Most messages a worker handles in one unit of work (one commit). 1 by default:
        measured on the saga, batches cut the database work per message but one worker
        adds queueing latency and several collide on hot aggregates (docs/architecture)."""
        self.timeout = timeout
        """Seconds to wait for the broker: to connect, and for each batch's confirms."""
        self.partitions = partitions or configured_partitions()
        self.lease = lease
        """Seconds a process's partitions stay its own without renewal (see ownership)."""
        self.member = member or new_member_id()
        """This process in the partition leases (host:pid:random by default)."""
        self._balancer: asyncio.Task[None] | None = None
        self._consumers: dict[str, _Consumer] = {}
        self._connection: AbstractRobustConnection | None = None
        self._probe: _QueueProbe | None = None
        """What partition_states asks the broker with while the bus runs (see _probing)."""
        # The robust connection only holds its channels weakly (to restore them after a
        # reconnection); these references keep them alive as long as the bus runs.
        self._channels: list[AbstractChannel] = []
        self._default: AbstractExchange | None = None
        self._events: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._log: AbstractExchange | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def log_exchange(self) -> str:
        """Where the relays ship batches of events, for the consumers of the whole log."""
        return f"{self.namespace}.log"

    # -- lifecycle ----------------------------------------------------------------------

    def subscribe(
        self,
        consumer: str,
        handlers: Mapping[str, Handler],
        retry: RetryPolicy | None = None,
        *,
        concurrency: int | None = None,
        requires: str | None = None,
        whole_log: bool = False,
    ) -> None:
        if self._connection is not None:
            raise RuntimeError("subscribe before start()")
        if consumer in self._consumers:
            raise ValueError(f"consumer {consumer!r} is already subscribed")
        table = dict(handlers)
        check_handlers(consumer, table, self.schemas)
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._consumers[consumer] = _Consumer(
            consumer, table, self._queue_of(consumer), retry or self.retry,
            workers=concurrency or self.workers, batch=1 if concurrency else self.batch,
            whole_log=whole_log, partitions=self.partitions,
            slots=asyncio.Semaphore(concurrency or self.workers),
            requires=None if requires is None else check_tag(requires),
        )

    def _queue_of(self, consumer: str) -> str:
        return f"{self.namespace}.{consumer}"

    async def start(self) -> None:
        if self._connection is not None:
            return
        for consumer in self._consumers.values():  # refused before anything is declared
            check_queue_arguments(consumer.queue, self.work_queue_arguments)
            consumer.ownership = Ownership(
                self.store, consumer.queue, self.partitions, member=self.member,
                lease=self.lease,
            )
        try:
            connection = await aio_pika.connect_robust(
                self.url,
                timeout=self.timeout,
                client_properties={"connection_name": f"magasin:{self.namespace}"},
            )
        except _BROKER_ERRORS as exc:
            raise Unavailable(f"RabbitMQ is unreachable: {exc!r}") from exc
        self._stopping = False
        self._connection = connection
        try:
            await self._declare(connection)
        except BaseException:
            await self._close()
            raise
        connection.close_callbacks.add(self._connection_lost)
        connection.reconnect_callbacks.add(self._reconnected)
        if self._consumers:
            try:
                await self._rebalance()  # alone, a process consumes every partition at once
            except (MagasinError, *_BROKER_ERRORS) as exc:  # the balancer tries again
                log.error("could not take partitions yet: %r", exc)
            self._balancer = asyncio.create_task(self._balance(), name="bus:partitions")
        log.info("event bus connected to RabbitMQ, namespace %s", self.namespace)

    async def _declare(self, connection: AbstractRobustConnection) -> None:
        # Declarations go through robust channels, which declare them again (bindings and
        # consumers included) after a reconnection.
        publisher = await connection.channel(publisher_confirms=True)
        self._channels.append(publisher)
        self._default = publisher.default_exchange
        self._events = await publisher.declare_exchange(
            self.exchange, ExchangeType.TOPIC, durable=True
        )
        self._dlx = await publisher.declare_exchange(
            self.dead_letter_exchange, ExchangeType.DIRECT, durable=True
        )
        self._log = await publisher.declare_exchange(
            self.log_exchange, ExchangeType.FANOUT, durable=True
        )
        for consumer in self._consumers.values():
            channel = await connection.channel(publisher_confirms=False)
            self._channels.append(channel)
            await channel.set_qos(prefetch_count=max(self.prefetch, consumer.workers))
            bound = await self._bound_before(consumer)
            for partition in range(consumer.partitions):
                name = consumer.partition_queue(partition)
                work = await _declare_queue(channel, name, self._work_arguments(consumer))
                consumer.queues[partition] = work
                for event_type in consumer.handlers:
                    if not consumer.whole_log:  # that one's events come shipped
                        await work.bind(self._events, routing_key=binding_key(
                            event_type, partition, consumer.requires))
                    # Bound (above) before unbound: no moment without a binding.
                    for key in _stale_bindings(bound, consumer, event_type, partition):
                        await work.unbind(self._events, routing_key=key)
                for level in range(1, consumer.retry.levels + 1):
                    await _declare_queue(
                        channel,
                        consumer.retry_queue(partition, level),
                        {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": name},
                    )
            dlq = await _declare_queue(channel, consumer.dead_letter_queue)
            await dlq.bind(self._dlx, routing_key=consumer.name)
            consumer.tags = [(dlq, await dlq.consume(self._spawner(consumer, self._record)))]
            if consumer.whole_log:
                consumer.tags.append(await self._consume_log(connection, consumer))
            if bound != _binding_scheme(consumer):
                await self._remember_bindings(consumer)

    async def _consume_log(
        self, connection: AbstractRobustConnection, consumer: _Consumer
    ) -> tuple[AbstractQueue, str]:
        """Consume `<queue>.log`, bound to the log exchange, on a channel of its own. Every
        process of the service does; the queue's single active consumer is the one the
        broker delivers to, the others take over if it goes."""
        channel = await connection.channel(publisher_confirms=False)
        self._channels.append(channel)
        await channel.set_qos(prefetch_count=_LOG_PREFETCH)
        queue = await _declare_queue(channel, consumer.log_queue, self._work_arguments(consumer))
        await queue.bind(self._require(self._log), routing_key="")
        return queue, await queue.consume(self._shipped(consumer))

    async def _unbind_type(self, consumer: _Consumer, event_type: str, partition: int) -> None:
        """Remove the bindings of `event_type` from the consumer's queue of `partition`
        (every form an older start may have bound; unbinding one that is not there is a
        no-op)."""
        queue = consumer.queues.get(partition)
        if queue is None:
            return
        keys = {untagged_binding_key(event_type, partition),
                binding_key(event_type, partition, None)}
        if consumer.requires is not None:
            keys.add(binding_key(event_type, partition, consumer.requires))
        try:
            for key in sorted(keys):
                await queue.unbind(self._require(self._events), routing_key=key)
        except Exception as exc:  # the next such message tries again
            log.warning("could not unbind %s from %s: %r", event_type, queue.name, exc)
            return
        log.info("%s no longer handles %s: its binding to %s is removed",
                 consumer.name, event_type, queue.name)

    async def _bound_before(self, consumer: _Consumer) -> dict[str, Any] | None:
        """How this consumer's queues were bound by the last start that recorded it (None:
        never recorded, or unreadable: then every stale binding is removed, to be sure)."""
        try:
            return await self.store.get_document(BINDINGS, consumer.queue)
        except MagasinError as exc:
            log.warning("could not read how %s was bound: %r", consumer.name, exc)
            return None

    async def _remember_bindings(self, consumer: _Consumer) -> None:
        try:
            async with self.store.transaction() as uow:
                uow.put_document(BINDINGS, consumer.queue, _binding_scheme(consumer))
        except MagasinError as exc:  # the next start removes the stale bindings again
            log.warning("could not record how %s is bound: %r", consumer.name, exc)

    def _work_arguments(self, consumer: _Consumer) -> dict[str, Any]:
        # One process at a time consumes a partition, whatever the leases say.
        arguments = {**self.work_queue_arguments, "x-single-active-consumer": True}
        if arguments.get("x-dead-letter-exchange") == self.dead_letter_exchange:
            # What the broker dead-letters keeps its routing key unless told otherwise; the
            # consumer's name is what binds its dead-letter queue to our exchange.
            arguments.setdefault("x-dead-letter-routing-key", consumer.name)
        return arguments

    async def stop(self, grace: float = 5.0) -> None:
        if self._connection is None:
            return
        self._stopping = True
        if self._balancer is not None:
            self._balancer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._balancer
            self._balancer = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            async with asyncio.timeout(grace):
                for consumer in self._consumers.values():
                    for queue, tag in consumer.tags:
                        await queue.cancel(tag)
                    for _, queue, tag in list(consumer.consuming.values()):
                        await queue.cancel(tag)
        except _BROKER_ERRORS as exc:
            # Closing the connection below cancels the consumers anyway.
            log.warning("could not cancel RabbitMQ consumers cleanly: %r", exc)
        if self._inflight:
            _, pending = await asyncio.wait(
                set(self._inflight), timeout=max(0.0, deadline - loop.time())
            )
            # Their messages stay unacked, so the broker delivers them again once the
            # connection is closed; an interrupted unit of work has committed nothing.
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._close()
        # Only now, with what it held back in the queues, may others take its partitions.
        for consumer in self._consumers.values():
            consumer.consuming.clear()
            consumer.waiting.clear()
            consumer.running.clear()
            consumer.draining.clear()
            if consumer.ownership is not None:
                try:
                    await consumer.ownership.leave()
                except Exception as exc:  # its leases expire anyway
                    log.warning("could not free the partitions of %s: %r", consumer.name, exc)
        log.info("event bus disconnected from RabbitMQ, namespace %s", self.namespace)

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        probe, self._probe = self._probe, None
        if probe is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await probe.close()
        self._default = self._events = self._dlx = self._log = None
        self._channels.clear()
        for consumer in self._consumers.values():
            consumer.tags = []
            consumer.queues = {}
        if connection is not None:
            await connection.close()

    def _connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        if not self._stopping:
            log.warning("connection to RabbitMQ lost (%r); reconnecting", exc)

    def _reconnected(self, _: object) -> None:
        log.warning("reconnected to RabbitMQ, namespace %s", self.namespace)

    async def delete_topology(self) -> None:
        """Delete every exchange and queue this bus declares (call it after `stop()`)."""
        try:
            connection = await aio_pika.connect(self.url, timeout=self.timeout)
        except _BROKER_ERRORS as exc:
            raise Unavailable(f"RabbitMQ is unreachable: {exc!r}") from exc
        try:
            channel = await connection.channel()
            for consumer in self._consumers.values():
                for partition in range(consumer.partitions):
                    await channel.queue_delete(consumer.partition_queue(partition))
                    for level in range(1, consumer.retry.levels + 1):
                        await channel.queue_delete(consumer.retry_queue(partition, level))
                await channel.queue_delete(consumer.dead_letter_queue)
                if consumer.whole_log:
                    await channel.queue_delete(consumer.log_queue)
            await channel.exchange_delete(self.exchange)
            await channel.exchange_delete(self.dead_letter_exchange)
            await channel.exchange_delete(self.log_exchange)
        finally:
            await connection.close()

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, events: Sequence[RecordedEvent]) -> None:
        if not events:
            return
        exchange = self._require(self._events)
        # An event type nobody consumes is normal, hence not mandatory. Each message carries
        # its publish span as traceparent (envelope and header): handlers are its children.
        with tracing.publishing(events, "rabbitmq") as sent:
            await self._confirmed(
                [(exchange, _event_message(e),
                  routing_key(e.routing_key, event_partition(e, self.partitions),
                              tags_of(e.metadata))) for e in sent],
                mandatory=False,
            )

    async def ship(self, events: Sequence[RecordedEvent]) -> None:
        if not events:
            return
        message = aio_pika.Message(
            encode_envelopes(events), content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"x-magasin-events": len(events)},
        )
        await self._confirmed([(self._require(self._log), message, "")], mandatory=False)

    async def publish_raw(self, routing_key: str, body: bytes, partition: int = 0) -> None:
        """Publish arbitrary bytes to the events exchange, to one partition (tests inject
        bad messages so)."""
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        exchange = self._require(self._events)
        await self._confirmed([(exchange, message, f"{routing_key}.{partition}")],
                              mandatory=False)

    def _require(self, exchange: AbstractExchange | None) -> AbstractExchange:
        if exchange is None:
            raise Unavailable("the RabbitMQ event bus is not started")
        return exchange

    async def _confirmed(
        self,
        sends: Sequence[tuple[AbstractExchange, aio_pika.Message, str]],
        *,
        mandatory: bool,
    ) -> None:
        """Publish all at once and wait for every confirm; Unavailable if any is missing."""
        try:
            async with asyncio.timeout(self.timeout):
                results = await asyncio.gather(
                    *(ex.publish(msg, key, mandatory=mandatory) for ex, msg, key in sends),
                    return_exceptions=True,
                )
        except TimeoutError as exc:
            raise Unavailable(
                f"RabbitMQ did not confirm {len(sends)} message(s) in {self.timeout}s"
            ) from exc
        for result in results:
            if isinstance(result, (*_BROKER_ERRORS, asyncio.CancelledError)):
                raise Unavailable(f"RabbitMQ refused or lost a message: {result!r}") from result
            if isinstance(result, BaseException):
                raise result
            if not isinstance(result, aiormq.spec.Basic.Ack):
                # Only a mandatory message comes back like this: its queue is missing.
                raise Unavailable(f"RabbitMQ could not route a message: {result!r}")

    # -- consuming ----------------------------------------------------------------------

    def _spawner(
        self, consumer: _Consumer, work: Work
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        """The consume callback: one task per message, so handlers of a consumer run
        concurrently (the broker's prefetch bounds how many)."""

        async def spawn(message: AbstractIncomingMessage) -> None:
            metrics.delivered(consumer.name, "dead_letter")
            if self._stopping:
                return  # left unacked: the broker delivers it again after we disconnect
            task = asyncio.create_task(self._guarded(work, consumer, message))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return spawn

    # -- partitions ---------------------------------------------------------------------

    async def _balance(self) -> None:
        """Renew this process's membership and leases, and follow the plan, every third of
        a lease; a storage failure is retried at the next tick."""
        while not self._stopping:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("could not renew partition leases: %r", exc)

    async def _rebalance(self) -> None:
        consumers = list(self._consumers.values())
        ownerships = [c.ownership for c in consumers if c.ownership is not None]
        assert len(ownerships) == len(consumers)
        # Every consumer's renewal in one unit of work, from one read of each collection.
        plans = await plan_all(ownerships)
        try:
            for consumer, (acquire, release) in zip(consumers, plans, strict=True):
                for partition in sorted(release - consumer.draining):
                    consumer.draining.add(partition)
                    task = asyncio.create_task(self._give_up(consumer, partition))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                for partition in sorted(acquire):
                    await self._take(consumer, partition)
        except BaseException:
            # The plan counted every partition it leased as owned; those not consumed yet
            # (the broker went away midway: this consumer's next ones and every later
            # consumer's) are not, or no tick would ever take them again. Their leases
            # are this member's: the next tick takes them (or they expire for another).
            for consumer in consumers:
                assert consumer.ownership is not None
                consumer.ownership.owned -= {
                    p for p in consumer.ownership.owned
                    if p not in consumer.consuming and p not in consumer.draining}
            raise

    async def _take(self, consumer: _Consumer, partition: int) -> None:
        """Consume `partition` of `consumer` on a channel of its own."""
        connection = self._connection
        if connection is None:
            raise Unavailable("the RabbitMQ event bus is not started")
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=max(self.prefetch, consumer.workers))
        # Declared (same arguments: a no-op) so that the robust channel declares it and
        # consumes again after a reconnection.
        queue = await _declare_queue(channel, consumer.partition_queue(partition),
                                     self._work_arguments(consumer))
        tag = await queue.consume(self._arrival(consumer, partition))
        consumer.consuming[partition] = (channel, queue, tag)
        log.info("consumer %s takes partition %d", consumer.name, partition)

    async def _give_up(self, consumer: _Consumer, partition: int) -> None:
        """Close the partition's channel (what it had not acked goes back to the queue, in
        order, for the next owner), let what it was handling finish, then free its lease.
        A handler finishing after the close commits or finds the next owner's inbox mark:
        either way that event takes effect once, before the next owner moves past it."""
        try:
            taken = consumer.consuming.pop(partition, None)
            if taken is not None:
                try:
                    await taken[0].close()
                except _BROKER_ERRORS as exc:  # gone already: the broker took them back
                    log.warning("closing partition %d of %s: %r", partition, consumer.name,
                                exc)
            for slot, waiting in consumer.waiting.items():
                if slot[0] == partition:
                    waiting.clear()  # not started: back in the queue for the next owner
            while not consumer.idle(partition) and not self._stopping:
                await asyncio.sleep(0.01)
            if not self._stopping:
                assert consumer.ownership is not None
                await consumer.ownership.released(partition)
                log.info("consumer %s gives partition %d up", consumer.name, partition)
        finally:
            consumer.draining.discard(partition)

    async def partition_states(self) -> list[PartitionState]:
        """Owners from the leases; depths from the broker (None where a queue is missing,
        say before any process of the service declared it)."""
        found: list[PartitionState] = []
        async with self._probing() as probe:
            for consumer in sorted(self._consumers.values(), key=lambda c: c.name):
                owners = {lease.partition: lease.owner
                          for lease in await leases(self.store, consumer.queue)}
                for partition in range(consumer.partitions):
                    # What waits for a retry counts: it comes back to this partition.
                    depth: int | None = 0
                    for name in [consumer.partition_queue(partition)] + [
                        consumer.retry_queue(partition, level)
                        for level in range(1, consumer.retry.levels + 1)
                    ]:
                        counts = await probe.counts(name)
                        if counts is None:
                            depth = None
                            break
                        depth = (depth or 0) + counts[0]
                    found.append(PartitionState(consumer.name, partition,
                                                owners.get(partition), depth))
                if consumer.whole_log:
                    found.append(await _log_queue_state(probe, consumer))
        return found

    @contextlib.asynccontextmanager
    async def _probing(self) -> AsyncIterator[_QueueProbe]:
        """A probe on a plain connection (not the robust one, which would declare the
        queues again after a reconnection). While the bus runs it is kept, with its
        connection and channel, from one call to the next (the sampler asks every few
        seconds: a connection each time was a handshake with the broker each time); a
        stopped bus opens one for the call."""
        kept = self._connection is not None and not self._stopping
        probe = self._probe if kept else None
        if probe is None or probe.is_closed:
            try:
                connection = await aio_pika.connect(self.url, timeout=self.timeout)
            except _BROKER_ERRORS as exc:
                raise Unavailable(f"RabbitMQ is unreachable: {exc!r}") from exc
            probe = _QueueProbe(connection)
            if kept:
                self._probe = probe
        try:
            yield probe
        except BaseException:
            if probe is self._probe:
                self._probe = None
            await probe.close()
            raise
        if probe is not self._probe:
            await probe.close()

    def owned_partitions(self, consumer: str) -> list[int]:
        """The partitions of `consumer` this process consumes now."""
        return sorted(self._consumers[consumer].consuming)

    def _arrival(
        self, consumer: _Consumer, partition: int
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        """A partition queue's consume callback. A message joins its key's queue; each is
        worked by one task at a time, which takes every message waiting there (up to
        `batch`) in arrival order: one key's events are handled in order, other keys'
        meanwhile (at most `workers` at once in the process)."""

        async def arrive(message: AbstractIncomingMessage) -> None:
            metrics.delivered(consumer.name, "event")
            if self._stopping or partition not in consumer.consuming:
                # Left unacked: the broker delivers it again after we disconnect, or has
                # taken it back already (the partition's channel is closed).
                return
            # Batching commits a run of a partition's messages in one unit of work: then
            # one task per partition takes them (in order), whatever their keys.
            slot = (partition, "" if consumer.batch > 1 else _message_key(message))
            consumer.waiting.setdefault(slot, deque()).append(message)
            if slot not in consumer.running:
                consumer.running.add(slot)
                task = asyncio.create_task(self._work(consumer, slot))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

        return arrive

    async def _work(self, consumer: _Consumer, slot: Slot) -> None:
        try:
            waiting = consumer.waiting[slot]
            while waiting and not self._stopping:
                async with consumer.slots:  # then take what gathered meanwhile
                    if self._stopping or not waiting:  # stopping, or the partition given up
                        break
                    take = min(len(waiting), consumer.batch)
                    messages = [message for message in [waiting.popleft() for _ in range(take)]
                                if await self._current(consumer, message)]
                    if not messages:
                        continue
                    if len(messages) == 1:
                        await self._guarded(self._handle, consumer, messages[0])
                    else:
                        await self._handle_batch(consumer, messages)
        finally:
            consumer.running.discard(slot)
            if not consumer.waiting.get(slot):
                consumer.waiting.pop(slot, None)

    async def _current(self, consumer: _Consumer, message: AbstractIncomingMessage) -> bool:
        """Whether `message` came on its partition's channel as that channel is now. One
        delivered before a reconnection did not: the broker took it back when its connection
        died and delivers it again on the restored channel, so it is left unhandled here
        (handling it would only end in an ack to a connection that is gone)."""
        taken = consumer.consuming.get(_partition_of_message(message, self.partitions))
        if taken is None or taken[0].is_closed:
            return False  # given up, or reconnecting: the broker has it back
        try:
            delivered_on = message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return False  # its channel is closed
        return delivered_on is await taken[0].get_underlay_channel()

    async def _handle_batch(
        self, consumer: _Consumer, messages: list[AbstractIncomingMessage]
    ) -> None:
        """Messages seen for the first time, of types the consumer handles, go through
        `deliver_batch`; the others, and all of them if the batch does not commit, one by
        one through `_handle`, which gives each its own outcome (retry, dead letter...)."""
        together: list[AbstractIncomingMessage] = []
        events: list[RecordedEvent] = []
        alone: list[AbstractIncomingMessage] = []
        for message in messages:
            event = _first_delivery(consumer, message)
            if event is None:
                alone.append(message)
            else:
                together.append(message)
                events.append(event)
        # deliver_batch reports any failure as False, having written nothing. Alone, the
        # messages go in their arrival order (one key's order).
        if not alone and await deliver_batch(
            self.store, self.schemas, consumer.name, consumer.handlers, events, _nothing_more
        ):
            for message in together:
                await self._ack(message)
            return
        for message in messages:
            await self._guarded(self._handle, consumer, message)

    # -- consumers of the whole log ------------------------------------------------------

    def _shipped(
        self, consumer: _Consumer
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        """The consume callback of `<queue>.log`: one task takes every batch waiting."""

        async def arrive(message: AbstractIncomingMessage) -> None:
            metrics.delivered(consumer.name, "log")
            if self._stopping:
                return  # left unacked: the broker delivers it again after we disconnect
            consumer.shipped.append(message)
            if not consumer.shipping:
                consumer.shipping = True
                task = asyncio.create_task(self._ship_work(consumer))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

        return arrive

    async def _ship_work(self, consumer: _Consumer) -> None:
        try:
            while consumer.shipped and not self._stopping:
                await asyncio.sleep(_LOG_GATHER)  # off every sale's path
                messages = list(consumer.shipped)
                consumer.shipped.clear()
                try:
                    await self._handle_shipped(consumer, messages)
                except Exception:
                    log.exception("consumer %s could not process shipped events",
                                  consumer.name)
                    await asyncio.gather(*(self._requeue(message) for message in messages))
        finally:
            consumer.shipping = False

    async def _handle_shipped(
        self, consumer: _Consumer, messages: list[AbstractIncomingMessage]
    ) -> None:
        """Every event of the shipped batches waiting, in one unit of work; if that does not
        commit (or a batch was delivered before), one by one, each with its own outcome: an
        event that fails goes to its partition's retry queue alone, and from there on is a
        message like any other (retried, then dead-lettered). The batches are acked once
        each of their events took effect or sits in a retry or dead-letter queue."""
        batches: list[AbstractIncomingMessage] = []
        events: list[RecordedEvent] = []
        for message in messages:
            try:
                shipped = decode_envelopes(message.body)
            except MalformedMessage as exc:
                metrics.consumed(consumer.name, "<undecodable>", "malformed", 0.0)
                await self._dead_letter(consumer, message, str(exc), 1)
                continue
            batches.append(message)
            events += [e for e in shipped if e.type in consumer.handlers
                       and carries(e.metadata, consumer.requires)]
        # Each stream's events in version order (what an archive appending at the original
        # versions needs): batches of several publishers arrive interleaved.
        events.sort(key=lambda e: (e.stream_id, e.stream_version))
        fresh = not any(message.redelivered for message in batches)
        if events and not (fresh and await deliver_batch(
                self.store, self.schemas, consumer.name, consumer.handlers, events,
                _nothing_more)):
            for event in events:
                if not await self._deliver_shipped(consumer, event):
                    # The broker has them again; the inbox absorbs what took effect.
                    await asyncio.gather(*(self._requeue(message) for message in batches))
                    return
        for message in batches:
            await self._ack(message)

    async def _deliver_shipped(self, consumer: _Consumer, event: RecordedEvent) -> bool:
        """One event of a batch alone; False if its retry or dead letter could not be sent."""
        try:
            result = await deliver(self.store, self.schemas, consumer.name,
                                   consumer.handlers[event.type], event)
        except Exception as exc:  # the inbox pre-check could not read the store
            result = Result(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        if result.outcome in (Outcome.HANDLED, Outcome.DUPLICATE):
            return True
        return await self._set_aside(
            consumer, {ORIGINAL_ROUTING_KEY: event.routing_key}, partial(_event_message, event),
            event_partition(event, self.partitions), 1, result.reason,
            retry=result.outcome is Outcome.FAILED and consumer.retry.attempts > 1)

    async def _guarded(
        self, work: Work, consumer: _Consumer, message: AbstractIncomingMessage
    ) -> None:
        try:
            await work(consumer, message)
        except Exception:
            # Never let one message take the consumer down; the broker redelivers it.
            log.exception("consumer %s could not process a message", consumer.name)
            await self._requeue(message)

    async def _handle(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        failed_before = _int_header(message.headers, ATTEMPTS, 0)
        try:
            event = decode_envelope(message.body)
        except MalformedMessage as exc:
            metrics.consumed(consumer.name, "<undecodable>", "malformed", 0.0)
            await self._dead_letter(consumer, message, str(exc), failed_before + 1)
            return
        if not carries(event.metadata, consumer.requires):
            # Not meant for it (a binding an older version left, say): nothing to do but
            # count the delivery, so that the broker's routing can be checked.
            metrics.consumed(consumer.name, event.type, "untagged", 0.0)
            await self._ack(message)
            return
        handler = consumer.handlers.get(event.type)
        route = routed(message.routing_key) if handler is None else None
        if route is not None and route.event_type == event.type:
            # A type this consumer handled in an older version, routed here by the binding
            # that version left: not meant for it any more. Drop the binding, count it. (A
            # routing key naming another type than the envelope is dead-lettered below.)
            await self._unbind_type(consumer, event.type, route.partition)
            metrics.consumed(consumer.name, event.type, "unbound", 0.0)
            await self._ack(message)
            return
        if handler is None:
            metrics.consumed(consumer.name, event.type, "malformed", 0.0)
            reason = f"unknown event type {event.type!r} for consumer {consumer.name!r}"
            await self._dead_letter(consumer, message, reason, failed_before + 1)
            return
        # The inbox mark committed with the effects is what keeps them single; reading it
        # up front only spares a handler's outside calls, worth a query only for messages
        # the broker delivered before (an outbox duplicate is still caught at commit).
        precheck = message.redelivered or failed_before > 0
        try:
            result = await deliver(
                self.store, self.schemas, consumer.name, handler, event, precheck=precheck
            )
        except Exception as exc:  # the inbox pre-check could not read the store
            result = Result(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        if result.outcome in (Outcome.HANDLED, Outcome.DUPLICATE):
            await self._ack(message)
        elif result.outcome is Outcome.MALFORMED:
            await self._dead_letter(consumer, message, result.reason, failed_before + 1)
        elif failed_before + 1 < consumer.retry.attempts:
            await self._retry_later(consumer, message, failed_before + 1, result.reason)
        else:
            await self._dead_letter(consumer, message, result.reason, failed_before + 1)

    async def _retry_later(
        self, consumer: _Consumer, message: AbstractIncomingMessage, failed: int, reason: str
    ) -> None:
        await self._aside(consumer, message, failed, reason, retry=True)

    async def _dead_letter(
        self, consumer: _Consumer, message: AbstractIncomingMessage, reason: str, attempts: int
    ) -> None:
        await self._aside(consumer, message, attempts, reason, retry=False)

    async def _aside(
        self, consumer: _Consumer, message: AbstractIncomingMessage, failed: int, reason: str,
        *, retry: bool,
    ) -> None:
        """Set a failed message aside (see `_set_aside`), then ack it; or hand it back to
        the broker if that could not be done."""
        if await self._set_aside(
            consumer, _forwarded_headers(message), partial(_copy, message),
            _partition_of_message(message, self.partitions), failed, reason, retry=retry,
        ):
            await self._ack(message)
        else:
            await self._requeue(message)

    async def _set_aside(
        self, consumer: _Consumer, headers: dict[str, Any], copy: Copy, partition: int,
        failed: int, reason: str, *, retry: bool,
    ) -> bool:
        """Send what failed `failed` times to its partition's retry queue (`retry`), whose
        TTL brings it back after the backoff, or to the consumer's dead letters, with
        `headers` (its routing key first published) and the bookkeeping; False if the
        broker did not take it."""
        headers[ATTEMPTS] = failed
        if retry:
            delay = consumer.retry.delay(failed)
            send = (self._require(self._default), copy(headers, delay),
                    consumer.retry_queue(partition, consumer.retry_level(failed)))
        else:
            headers.update({REASON: reason[:_MAX_REASON], CONSUMER: consumer.name,
                            DEAD_LETTERED_AT: utcnow().isoformat()})
            send = (self._require(self._dlx), copy(headers, None), consumer.name)
        try:
            await self._confirmed([send], mandatory=True)
        except Unavailable as exc:
            log.error("consumer %s could not %s: %s", consumer.name,
                      "schedule a retry" if retry else "dead-letter a message", exc)
            return False
        if retry:
            log.info("consumer %s retries %s in %.3fs after failed attempt %d: %s",
                     consumer.name, send[1].message_id, delay, failed, reason)
            metrics.retried(consumer.name)
        return True

    async def _record(self, consumer: _Consumer, message: AbstractIncomingMessage) -> None:
        """Keep one message of the consumer's dead-letter queue as a DeadLetter document."""
        letter = _letter(consumer.name, message)
        try:
            async with self.store.transaction() as uow:
                deadletters.record(uow, letter)
        except Exception as exc:
            log.error("could not record dead letter %s: %r", letter.id, exc)
            await self._requeue(message)
            return
        await self._ack(message)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            # Bounded: an ack to a connection that died may never be written (aiormq queues
            # the frame for a writer that is gone), and the key's next messages wait on it.
            async with asyncio.timeout(self.timeout):
                await message.ack()
        except _BROKER_ERRORS as exc:
            # The channel is gone: the broker delivers the message again and the inbox
            # (or the dead letter's fixed id) absorbs the repeat.
            log.warning("could not ack message %s: %r", message.message_id, exc)

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        """Hand a message back to the broker after a pause, so a persistent failure does
        not spin; if the channel is gone the broker requeues it by itself."""
        await asyncio.sleep(_REQUEUE_PAUSE)
        try:
            async with asyncio.timeout(self.timeout):  # as an ack (see _ack)
                await message.nack(requeue=True)
        except _BROKER_ERRORS as exc:
            log.warning("could not requeue message %s: %r", message.message_id, exc)

    # -- operating dead letters ---------------------------------------------------------

    async def requeue_dead_letter(self, letter_id: str) -> DeadLetter:
        # Marked first, sent second: if the message failed again at once, its new dead
        # letter must not be overwritten by this mark. A send that fails undoes the mark.
        requeued = await deadletters.claim_requeue(self.store, letter_id)
        event = requeued.event
        assert event is not None
        headers: dict[str, Any] = {ORIGINAL_ROUTING_KEY: requeued.routing_key,
                                   KEY_HEADER: key_of(event)}
        if event.traceparent:
            headers["traceparent"] = event.traceparent
        message = aio_pika.Message(
            requeued.body.encode(), headers=headers, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=event.event_id,
            type=event.type, correlation_id=event.correlation_id,
        )
        queue = f"{self._queue_of(requeued.consumer)}.p{event_partition(event, self.partitions)}"
        try:
            await self._send_to_queue(queue, message)
        except Unavailable:
            await deadletters.undo_requeue(self.store, requeued)
            raise
        return requeued

    async def _send_to_queue(self, queue: str, message: aio_pika.Message) -> None:
        """Straight into one consumer's work queue (no attempt header: a fresh budget);
        through a short connection of its own when the bus is not started (a CLI)."""
        if self._default is not None:
            await self._confirmed([(self._default, message, queue)], mandatory=True)
            return
        try:
            connection = await aio_pika.connect(self.url, timeout=self.timeout)
        except _BROKER_ERRORS as exc:
            raise Unavailable(f"RabbitMQ is unreachable: {exc!r}") from exc
        try:
            channel = await connection.channel(publisher_confirms=True)
            await self._confirmed([(channel.default_exchange, message, queue)], mandatory=True)
        finally:
            await connection.close()


class _QueueProbe:
    """Passive declares of queues on one channel of its own connection: (messages ready,
    consumers) of each, None for a missing one. The broker closes the channel on a missing
    queue (404), so the next probe opens another; otherwise one channel serves them all (a
    channel per queue made every sample, every 5 s, four round trips a queue: a service's
    idle broker traffic)."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @property
    def is_closed(self) -> bool:
        return bool(self._connection.is_closed)

    async def close(self) -> None:
        """Close its connection, and with it its channel."""
        self._channel = None
        await self._connection.close()

    async def counts(self, queue: str) -> tuple[int, int] | None:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=False)
        try:
            declared = (await self._channel.declare_queue(queue, passive=True)
                        ).declaration_result
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._channel = None
            return None
        return declared.message_count or 0, declared.consumer_count or 0


async def _log_queue_state(probe: _QueueProbe, consumer: _Consumer) -> PartitionState:
    """What waits in a consumer's queue of shipped batches, and how many processes consume
    it (None where it is missing)."""
    counts = await probe.counts(consumer.log_queue)
    if counts is None:
        return PartitionState(consumer.name, None, None, None)
    ready, consumers = counts
    owner = f"{consumers} process(es), one at a time" if consumers else None
    return PartitionState(consumer.name, None, owner, ready)


def _event_message(
    event: RecordedEvent, extra: dict[str, Any] | None = None, expiration: float | None = None
) -> aio_pika.Message:
    headers: dict[str, Any] = {KEY_HEADER: key_of(event), **(extra or {})}
    if event.traceparent:
        headers["traceparent"] = event.traceparent
    return aio_pika.Message(
        event.to_json(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.event_id,
        type=event.type,
        correlation_id=event.correlation_id,
        headers=headers,
        expiration=expiration,
    )


def _message_key(message: AbstractIncomingMessage) -> str:
    """The partition key the publisher stamped (else the envelope's; "" if undecodable)."""
    key = message.headers.get(KEY_HEADER)
    if isinstance(key, str):
        return key
    try:
        return key_of(decode_envelope(message.body))
    except MalformedMessage:
        return ""


def _partition_of_message(message: AbstractIncomingMessage, partitions: int) -> int:
    """The partition a message was routed to (its routing key's third word, when the events
    exchange routed it), else its key's."""
    route = routed(message.routing_key)
    if message.exchange and route is not None:
        return route.partition % partitions
    return stable_hash(_message_key(message)) % partitions


def _event_routing_key(routing_key: str) -> str:
    """`<aggregate>.<EventType>` of a partitioned routing key (`....<partition>[.<tag>...]`)."""
    route = routed(routing_key)
    return routing_key if route is None else route.event_key


def _forwarded_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The application headers (traceparent, ...) without the broker's and our bookkeeping,
    plus the routing key the event was first published with."""
    headers: dict[str, Any] = {
        k: v for k, v in message.headers.items() if not k.startswith("x-")
    }
    original = message.headers.get(ORIGINAL_ROUTING_KEY)
    headers[ORIGINAL_ROUTING_KEY] = (
        original if isinstance(original, str) else _event_routing_key(message.routing_key or "")
    )
    return headers


def _copy(
    message: AbstractIncomingMessage, headers: dict[str, Any], expiration: float | None = None
) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        type=message.type,
        correlation_id=message.correlation_id,
        expiration=expiration,
    )


def _letter(consumer: str, message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers
    try:
        event: RecordedEvent | None = decode_envelope(message.body)
    except MalformedMessage:
        event = None
    # A fixed id per message: a dead letter delivered twice overwrites itself.
    ident = message.message_id or "sha256-" + hashlib.sha256(message.body).hexdigest()[:32]
    at = headers.get(DEAD_LETTERED_AT)
    return DeadLetter(
        id=f"{consumer}:{ident}",
        consumer=consumer,
        reason=str(headers.get(REASON) or _broker_reason(headers)),
        attempts=_int_header(headers, ATTEMPTS, 1),
        routing_key=str(headers.get(ORIGINAL_ROUTING_KEY,
                                    _event_routing_key(message.routing_key or ""))),
        dead_lettered_at=datetime.fromisoformat(at) if isinstance(at, str) else utcnow(),
        event=event,
        body=message.body.decode("utf-8", errors="replace"),
    )


def _broker_reason(headers: HeadersType) -> str:
    """Why the broker itself dead-lettered a message (a work queue's delivery limit, say)."""
    why = headers.get("x-first-death-reason")
    if isinstance(why, bytes):
        why = why.decode(errors="replace")
    return f"dead-lettered by the broker: {why}" if why else "no reason given"


async def _declare_queue(
    channel: AbstractChannel, name: str, arguments: Mapping[str, Any] | None = None
) -> AbstractQueue:
    """Every queue this bus declares goes through here, so none escapes the argument check."""
    check_queue_arguments(name, arguments)
    return await channel.declare_queue(name, durable=True, arguments=dict(arguments or {}))


def _binding_scheme(consumer: _Consumer) -> dict[str, Any]:
    scheme: dict[str, Any] = {"scheme": SCHEME, "requires": consumer.requires}
    if consumer.whole_log:
        scheme["whole_log"] = True
    return scheme


def _stale_bindings(
    bound: Mapping[str, Any] | None, consumer: _Consumer, event_type: str, partition: int
) -> list[str]:
    """Bindings an older start may have left on a partition queue that would now send the
    consumer events it does not want: those of queues declared before routing tags
    (`*.<type>.<i>`, which tagged routing keys do not match either), the binding to every
    tag when the consumer now requires one, and that of the tag it required before.
    Nothing when the last recorded start bound it as now. Unbinding a binding that is not
    there is a no-op (RabbitMQ >= 3.2)."""
    if bound == _binding_scheme(consumer):
        return []
    stale = [untagged_binding_key(event_type, partition)]
    if consumer.requires is not None or consumer.whole_log:
        stale.append(binding_key(event_type, partition, None))
    if consumer.whole_log and consumer.requires is not None:  # it gets its events shipped
        stale.append(binding_key(event_type, partition, consumer.requires))
    before = (bound or {}).get("requires")
    if isinstance(before, str) and before != consumer.requires:
        stale.append(binding_key(event_type, partition, before))
    return stale


def _int_header(headers: HeadersType, name: str, default: int) -> int:
    value = headers.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _first_delivery(consumer: _Consumer, message: AbstractIncomingMessage) -> RecordedEvent | None:
    """The event of a message that may join a batch: decodable, of a type the consumer
    handles, never delivered nor retried before (those get `_handle`'s inbox pre-check)."""
    if message.redelivered or _int_header(message.headers, ATTEMPTS, 0) > 0:
        return None
    try:
        event = decode_envelope(message.body)
    except MalformedMessage:
        return None
    if event.type not in consumer.handlers or not carries(event.metadata, consumer.requires):
        return None
    return event


def _nothing_more(_: UnitOfWork) -> None:
    """A broker consumer has no bookkeeping to commit with a batch: acks come after."""
