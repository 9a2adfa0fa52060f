"""In-process event bus for embedded mode, durable because it is built on the event log.

Each consumer runs N lanes (the partitions, `MAGASIN_PARTITIONS`, default 4): lane i tails
the store's global log from a checkpoint of its own and handles, in log order, the events
whose key (`partitioning.key_of`: the customer of a sale) falls in partition i. Events of one
key are handled in publish order; lanes run concurrently. A lane's checkpoint is committed
in the same unit of work as the handler's effects and its inbox mark, so after a `kill -9`
the lane resumes exactly after the last event whose effects committed: nothing lost,
nothing handled twice. When N changes, the new lanes start from the slowest old lane: what
the others handled already comes again and the inbox skips it, so no key's events reorder.
A lane skips the events its consumer does not handle: other types, and, for a consumer that
requires a routing tag (`tags`), the events without it (no handler run, no inbox mark; the
checkpoint moves over them lazily, once the log is quiet or LAZY_MOVE_MAX_S after, with no
commit of its own before).

A failing event becomes a retry document (also committed with the checkpoint) that a
separate loop replays with backoff, so the events behind it keep flowing (a retried event
is thus handled after later events of its key); after the last attempt it becomes a dead
letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from magasin.eventstore.store import ANY, Append, EventStore, UnitOfWork
from magasin.eventstore.window import LogWindow
from magasin.messaging import deadletters
from magasin.messaging.bus import DeadLetter, EventBus, Handler, PartitionState, RetryPolicy
from magasin.messaging.dispatch import (
    Outcome,
    Result,
    check_handlers,
    deliver,
    deliver_batch,
    deliver_concurrently,
)
from magasin.messaging.partitioning import configured_partitions, event_partition, key_of
from magasin.messaging.tags import carries, check_tag
from magasin.observability import metrics
from magasin.shared.clock import utcnow
from magasin.shared.errors import MagasinError
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

RETRIES = "bus.retries"
LAZY_MOVE_MAX_S = 5.0
"""Longest a lane leaves its checkpoint behind events it ignores while the log keeps
moving (once quiet for a poll, it moves at once): moved at every poll, it cost a sale
a quarter of a commit at moderate rates, for a replay after a crash that costs nothing."""
LANES = "bus.lanes"
"""One document per consumer: the number of lanes its checkpoints are for."""
log = logging.getLogger("magasin.messaging.inprocess")


@dataclass
class _Subscription:
    consumer: str
    handlers: dict[str, Handler]
    retry: RetryPolicy
    concurrency: int | None = None
    retry_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    busy: set[asyncio.Task[None]] = field(default_factory=set)
    slots: asyncio.Semaphore | None = None
    """Shared by its lanes: at most `concurrency` handlers of the consumer at once."""
    requires: str | None = None
    """The routing tag an event must carry to be dispatched to it (see `tags`)."""

    @property
    def checkpoint(self) -> str:
        """The checkpoint of the consumer before it had lanes (read once to start them)."""
        return f"bus:{self.consumer}"

    def lane_checkpoint(self, lane: int, lanes: int) -> str:
        return f"bus:{self.consumer}#{lane}/{lanes}"


@dataclass(frozen=True)
class _Lane:
    sub: _Subscription
    index: int
    lanes: int

    @property
    def checkpoint(self) -> str:
        return self.sub.lane_checkpoint(self.index, self.lanes)

    def owns(self, event: RecordedEvent) -> bool:
        """Its consumer handles the event's type, the event carries the tag the consumer
        requires, and it falls in this lane's partition; the lane skips the others."""
        sub = self.sub
        return (event.type in sub.handlers
                and (sub.requires is None or carries(event.metadata, sub.requires))
                and event_partition(event, self.lanes) == self.index)


class InProcessBus(EventBus):
    """Event bus over an event store's log; `publish` only appends what the log lacks."""

    def __init__(
        self,
        store: EventStore,
        schemas: EventSchemas,
        *,
        retry: RetryPolicy | None = None,
        poll_interval: float = 0.5,
        page_size: int = 500,
        batch_size: int = 64,
        seed: int | None = None,
        partitions: int | None = None,
    ) -> None:
        self.store = store
        self.partitions = partitions or configured_partitions()
        """Lanes per consumer (MAGASIN_PARTITIONS unless given)."""
        store.log_is_bus = True  # its commits are now publishes (see EventStore.log_is_bus)
        self.schemas = schemas
        self.retry = retry or RetryPolicy()
        self._poll = poll_interval
        self._page = page_size
        self._window = LogWindow(store, size=max(4 * page_size, 2000))
        self._batch = batch_size
        self._rng = random.Random(seed)
        self._subs: dict[str, _Subscription] = {}
        self._ignored: dict[str, tuple[int, float]] = {}
        """By lane checkpoint: (position, since when) the checkpoint may move to over
        events the lane ignores; it does once the log is quiet, or LAZY_MOVE_MAX_S later
        (see `_tail`)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

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
        # A lane takes every event waiting in the log at once: a consumer of the whole log
        # is one like any other here.
        if self._tasks:
            raise RuntimeError("subscribe before start()")
        if consumer in self._subs:
            raise ValueError(f"consumer {consumer!r} is already subscribed")
        table = dict(handlers)
        check_handlers(consumer, table, self.schemas)
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._subs[consumer] = _Subscription(
            consumer, table, retry or self.retry, concurrency,
            slots=asyncio.Semaphore(concurrency) if concurrency else None,
            requires=None if requires is None else check_tag(requires),
        )

    async def start(self) -> None:
        self._stopping = False
        for sub in self._subs.values():
            self._tasks.append(asyncio.create_task(self._open(sub), name=f"open:{sub.consumer}"))
            self._tasks.append(
                asyncio.create_task(self._retries(sub), name=f"retry:{sub.consumer}")
            )

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        busy = {t for sub in self._subs.values() for t in sub.busy}
        for task in self._tasks:
            if task not in busy:
                task.cancel()
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for sub in self._subs.values():
            sub.busy.clear()

    async def publish(self, events: Sequence[RecordedEvent]) -> None:
        # Events appended through the store are in the log already; the idempotent append
        # makes those a no-op and adds the others, one stream event at a time.
        ops = [
            Append(
                e.stream_id,
                (
                    NewEvent(
                        type=e.type, payload=e.payload, event_id=e.event_id,
                        schema_version=e.schema_version, occurred_at=e.occurred_at,
                        correlation_id=e.correlation_id, causation_id=e.causation_id,
                        traceparent=e.traceparent, metadata=e.metadata,
                    ),
                ),
                ANY,
            )
            for e in events
        ]
        if ops:
            await self.store.commit(ops)

    async def ship(self, events: Sequence[RecordedEvent]) -> None:
        """Nothing to do: its consumers of the whole log read the log, like the others."""

    @property
    def window(self) -> LogWindow:
        """The window of the log's tail the subscriptions share (projections follow it too)."""
        return self._window

    async def requeue_dead_letter(self, letter_id: str) -> DeadLetter:
        def redeliver(uow: UnitOfWork, letter: DeadLetter) -> None:
            # A retry due now with no failed attempt behind it: the retry loop of the
            # letter's consumer (in this process or, for a CLI, in the running one) delivers
            # it with a fresh budget, and this commits with the letter's REQUEUED mark.
            assert letter.event is not None
            uow.put_document(RETRIES, letter.id, {
                "consumer": letter.consumer, "event_id": letter.event.event_id,
                "attempts": 0, "due": time.time(), "reason": "requeued",
            })

        requeued = await deadletters.claim_requeue(self.store, letter_id, redeliver)
        if (sub := self._subs.get(requeued.consumer)) is not None:
            sub.retry_wakeup.set()
        return requeued

    # -- the lanes ----------------------------------------------------------------------

    async def _open(self, sub: _Subscription) -> None:
        """Ready the lanes' checkpoints, then start one tailing task per lane."""
        while not await self._guard(self._prepare_lanes(sub), False):
            pass
        for index in range(self.partitions):
            lane = _Lane(sub, index, self.partitions)
            self._tasks.append(
                asyncio.create_task(self._tail(lane), name=f"tail:{sub.consumer}#{index}")
            )

    async def _prepare_lanes(self, sub: _Subscription) -> bool:
        """First start with N lanes (or with a new N): every lane starts where the slowest
        old one stood (the consumer's checkpoint before it had lanes, the first time)."""
        n = self.partitions
        known = await self.store.get_document(LANES, sub.consumer)
        if known is not None and known.get("partitions") == n:
            return True
        if known is None:
            start = await self.store.get_checkpoint(sub.checkpoint)
        else:
            old = int(known["partitions"])
            start = min([await self.store.get_checkpoint(sub.lane_checkpoint(i, old))
                         for i in range(old)])
        async with self.store.transaction() as uow:
            for index in range(n):
                uow.set_checkpoint(sub.lane_checkpoint(index, n), start)
            uow.put_document(LANES, sub.consumer, {
                "partitions": n, "started_at": start,
                "previous": None if known is None else known["partitions"],
            })
        log.info("consumer %s runs %d lanes from position %d", sub.consumer, n, start)
        return True

    async def partition_states(self) -> list[PartitionState]:
        head = await self.store.last_position()
        owner = f"embedded:{os.getpid()}"
        found: list[PartitionState] = []
        for consumer in sorted(self._subs):
            for lane, position in enumerate(await self.lane_positions(consumer)):
                # Events a lane passed as ignored wait for nothing, even while its stored
                # checkpoint has not moved over them yet (LAZY_MOVE_MAX_S).
                passed = self._ignored.get(self._subs[consumer].lane_checkpoint(
                    lane, self.partitions))
                done = position if passed is None else max(position, passed[0])
                found.append(PartitionState(consumer, lane, owner, max(0, head - done)))
        return found

    async def lane_positions(self, consumer: str) -> list[int]:
        """Each lane's checkpoint (the last log position it is done with)."""
        sub = self._subs[consumer]
        return [await self.store.get_checkpoint(sub.lane_checkpoint(i, self.partitions))
                for i in range(self.partitions)]

    async def _tail(self, lane: _Lane) -> None:
        me = asyncio.current_task()
        assert me is not None
        sub = lane.sub
        after: int | None = None
        while after is None:
            after = await self._guard(self.store.get_checkpoint(lane.checkpoint), None)
        seen_at = time.monotonic()  # when a read last found events
        while not self._stopping:
            page = await self._guard(self._window.read(after, self._page), [])
            if not page:
                ignored = self._ignored.get(lane.checkpoint)
                now = time.monotonic()
                if ignored is not None and (now - seen_at >= self._poll
                                            or now - ignored[1] >= LAZY_MOVE_MAX_S):
                    # The log quiet for a poll, or the checkpoint that far behind: move it
                    # over the ignored events now (lazily: replaying ignored events after
                    # a crash costs nothing).
                    await self._guard(self._save_checkpoint(lane, ignored[0]), None)
                    self._ignored.pop(lane.checkpoint, None)
                # Woken by a commit of an event this lane handles, not by every commit.
                await self._window.wait(after, self._poll, sub.handlers, lane.owns)
                continue
            seen_at = time.monotonic()
            sub.busy.add(me)
            try:
                after = await self._handle_page(lane, page, after)
            finally:
                sub.busy.discard(me)

    async def _handle_page(
        self, lane: _Lane, page: list[RecordedEvent], after: int
    ) -> int:
        sub = lane.sub
        # The type first, inline: most events of a page are of types the lane skips, and
        # some forty lanes read each page (a call each cost more than the rest of the scan).
        handled = sub.handlers
        mine = [e for e in page if e.type in handled and lane.owns(e)]
        if mine:
            self._ignored.pop(lane.checkpoint, None)  # its commit moves the checkpoint past
        for start in range(0, len(mine), self._batch):
            if self._stopping:
                return after
            chunk = mine[start:start + self._batch]
            last = chunk[-1].global_position

            def bookkeeping(uow: UnitOfWork, position: int = last) -> None:
                uow.set_checkpoint(lane.checkpoint, position)

            # One commit for the whole run of events; if anything in it goes wrong, nothing
            # was written and each event is delivered on its own to get its own outcome.
            if sub.slots is not None:
                if not await deliver_concurrently(
                    self.store, self.schemas, sub.consumer, sub.handlers, chunk, bookkeeping,
                    sub.slots,
                ):
                    after = await self._handle_concurrently(lane, chunk, last, after)
                    if after != last:
                        return after
            elif len(chunk) == 1 or not await deliver_batch(
                self.store, self.schemas, sub.consumer, sub.handlers, chunk, bookkeeping
            ):
                for event in chunk:
                    if self._stopping:
                        return after
                    await self._deliver_one(lane, event)
                    after = event.global_position
            after = last
        if page[-1].global_position > after:  # a tail of events this consumer ignores
            after = page[-1].global_position
            since = self._ignored.get(lane.checkpoint, (0, time.monotonic()))[1]
            self._ignored[lane.checkpoint] = (after, since)
        return after

    async def _handle_concurrently(
        self, lane: _Lane, mine: list[RecordedEvent], last: int, after: int
    ) -> int:
        """Up to `sub.concurrency` events at once (one key's events one after the other),
        each committed on its own with its own outcome (retry, dead letter); the checkpoint
        moves to `last` once all are settled. Stopped halfway, it stays put: what did commit
        is in the inbox, and its pre-check spares the handler's outside call when the
        events come again."""
        sub = lane.sub
        slots = sub.slots or asyncio.Semaphore(1)

        async def one(event: RecordedEvent) -> bool:
            async with slots:
                if self._stopping:
                    return False
                try:
                    result = await deliver(
                        self.store, self.schemas, sub.consumer, sub.handlers[event.type], event
                    )
                    if result.outcome not in (Outcome.HANDLED, Outcome.DUPLICATE):
                        await self._after_failure(sub, event, result, 1, lambda _: None)
                except MagasinError as exc:  # storage: the page comes again, the inbox dedupes
                    log.error("consumer %s could not settle %s: %r", sub.consumer,
                              event.event_id, exc)
                    return False
                return True

        async def in_order(events: list[RecordedEvent]) -> bool:
            for event in events:
                if not await one(event):
                    return False
            return True

        by_key: dict[str, list[RecordedEvent]] = {}
        for event in mine:
            by_key.setdefault(key_of(event), []).append(event)
        settled = await asyncio.gather(*(in_order(events) for events in by_key.values()))
        if not all(settled):
            if not self._stopping:
                await asyncio.sleep(min(self._poll, 1.0))
            return after
        await self._guard(self._save_checkpoint(lane, last), None)
        return last

    async def _deliver_one(self, lane: _Lane, event: RecordedEvent) -> None:
        sub = lane.sub
        position = event.global_position

        def bookkeeping(uow: UnitOfWork) -> None:
            uow.set_checkpoint(lane.checkpoint, position)

        result = await deliver(
            self.store, self.schemas, sub.consumer, sub.handlers[event.type], event,
            extra=bookkeeping, precheck=False,
        )
        if result.outcome is Outcome.DUPLICATE:
            await self._guard(self._save_checkpoint(lane, position), None)
        elif result.outcome is not Outcome.HANDLED:
            await self._after_failure(sub, event, result, 1, bookkeeping)

    async def _save_checkpoint(self, lane: _Lane, position: int) -> None:
        async with self.store.transaction() as uow:
            uow.set_checkpoint(lane.checkpoint, position)

    # -- retries and dead letters -------------------------------------------------------

    async def _after_failure(
        self,
        sub: _Subscription,
        event: RecordedEvent,
        result: Result,
        failed_attempts: int,
        bookkeeping: Any,
    ) -> None:
        """Commit, with `bookkeeping`, either the next retry or the dead letter."""
        give_up = result.outcome is Outcome.MALFORMED or failed_attempts >= sub.retry.attempts
        async with self.store.transaction() as uow:
            bookkeeping(uow)
            key = f"{sub.consumer}:{event.event_id}"
            if give_up:
                uow.delete_document(RETRIES, key)
                deadletters.record(
                    uow,
                    DeadLetter(
                        id=key, consumer=sub.consumer, reason=result.reason,
                        attempts=failed_attempts, routing_key=event.routing_key,
                        dead_lettered_at=utcnow(), event=event,
                        body=event.to_json().decode(),
                    ),
                )
            else:
                due = time.time() + sub.retry.delay(failed_attempts, self._rng)
                uow.put_document(
                    RETRIES,
                    key,
                    {
                        "consumer": sub.consumer, "event_id": event.event_id,
                        "attempts": failed_attempts, "due": due, "reason": result.reason,
                    },
                )
        if not give_up:
            metrics.retried(sub.consumer)
            sub.retry_wakeup.set()

    async def _retries(self, sub: _Subscription) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            pending = await self._guard(self._pending_retries(sub), [])
            now = time.time()
            due = [(key, doc) for key, doc in pending if doc["due"] <= now]
            sub.busy.add(me)
            try:
                for key, doc in due:
                    if self._stopping:
                        break
                    await self._guard(self._retry_one(sub, key, doc), None)
            finally:
                sub.busy.discard(me)
            later = [doc["due"] for _, doc in pending if doc["due"] > now]
            wait = min([self._poll * 4, *(d - now for d in later)]) if not due else 0.0
            sub.retry_wakeup.clear()
            if wait > 0:
                with contextlib.suppress(TimeoutError):  # not wait_for: it can eat a cancel
                    async with asyncio.timeout(wait):
                        await sub.retry_wakeup.wait()

    async def _pending_retries(self, sub: _Subscription) -> list[tuple[str, dict[str, Any]]]:
        found: list[tuple[str, dict[str, Any]]] = []
        after: str | None = None
        while page := await self.store.find_documents(
            RETRIES, where={"consumer": sub.consumer}, after_key=after, limit=500
        ):
            found += page
            after = page[-1][0]
        return found

    async def _retry_one(self, sub: _Subscription, key: str, doc: dict[str, Any]) -> None:
        event = await self.store.read_event(doc["event_id"])
        handler = sub.handlers[event.type]

        def clear(uow: UnitOfWork) -> None:
            uow.delete_document(RETRIES, key)

        result = await deliver(
            self.store, self.schemas, sub.consumer, handler, event, extra=clear,
            precheck=False,
        )
        if result.outcome is Outcome.DUPLICATE:
            async with self.store.transaction() as uow:
                clear(uow)
        elif result.outcome in (Outcome.FAILED, Outcome.MALFORMED):
            await self._after_failure(sub, event, result, int(doc["attempts"]) + 1, lambda _: None)

    async def _guard(self, step: Any, fallback: Any) -> Any:
        """Run a storage step; a storage failure is logged and retried later, never fatal."""
        try:
            return await step
        except MagasinError as exc:
            log.error("event bus storage step failed, retrying soon: %r", exc)
            await asyncio.sleep(min(self._poll, 1.0))
            return fallback
