"""One delivery of one event to one consumer: validate, run the handler with the inbox
mark in the same unit of work, and say what happened. Shared by every bus adapter."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from magasin.eventstore.store import Causation, EventStore, UnitOfWork
from magasin.messaging.bus import Handler
from magasin.messaging.partitioning import configured_partitions, inherited, key_of
from magasin.observability import logging as logs
from magasin.observability import metrics, tracing
from magasin.shared.errors import AlreadyProcessed, ConcurrencyError, MalformedMessage
from magasin.shared.messages import EventSchemas, RecordedEvent

log = logging.getLogger("magasin.messaging.dispatch")
CONFLICT_RETRIES = 10
BATCH_CONFLICT_RETRIES = 3


class Outcome(enum.Enum):
    HANDLED = "handled"
    DUPLICATE = "duplicate"
    MALFORMED = "malformed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""


async def deliver(
    store: EventStore,
    schemas: EventSchemas,
    consumer: str,
    handler: Handler,
    event: RecordedEvent,
    extra: Callable[[UnitOfWork], None] | None = None,
    precheck: bool = True,
) -> Result:
    """`_deliver`, counted and timed (magasin_events_consumed_total and friends)."""
    with tracing.handling(event, consumer), logs.delivering(event, consumer):
        started = time.perf_counter()
        result = await _deliver(store, schemas, consumer, handler, event, extra, precheck)
        metrics.consumed(
            consumer, event.type, result.outcome.value, time.perf_counter() - started
        )
    return result


def _causation(event: RecordedEvent, consumer: str) -> Causation:
    """The handler's events continue the trace from its own span when tracing is on."""
    # Caused events keep the cause's partition key (the customer of a sale): all the
    # events of one sale, whoever writes them, land in one partition in order.
    causation = Causation.of(
        event, consumer=consumer, **inherited(event.metadata, configured_partitions())
    )
    if (traceparent := tracing.current_traceparent()) is not None:
        causation = replace(causation, traceparent=traceparent)
    return causation


async def _deliver(
    store: EventStore,
    schemas: EventSchemas,
    consumer: str,
    handler: Handler,
    event: RecordedEvent,
    extra: Callable[[UnitOfWork], None] | None = None,
    precheck: bool = True,
) -> Result:
    """Run `handler` once in effect. `extra` adds the adapter's own bookkeeping (a checkpoint,
    a cleared retry) to the same unit of work, so it commits with the handler's effects."""
    try:
        # Handlers get the event at its current schema version, whatever version was stored.
        event = schemas.upcast(event)
        schemas.validate(event)
    except MalformedMessage as exc:
        return Result(Outcome.MALFORMED, str(exc))
    # The inbox check at commit is what guarantees one effect; this read only spares a
    # handler's outside calls (a bank, say) for a redelivery that is known already.
    if precheck and await store.is_processed(consumer, event.event_id):
        return Result(Outcome.DUPLICATE)
    try:
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                async with store.transaction(_causation(event, consumer)) as uow:
                    uow.trusts_cache = True  # it commits: the inbox mark
                    uow.guesses_new = attempt == 1  # a conflict's retry reads instead
                    uow.mark_processed(consumer, event.event_id)
                    await handler(event, uow)
                    if extra is not None:
                        extra(uow)
                break
            except ConcurrencyError:
                # Another writer moved an aggregate this handler loaded: reload and redo at
                # once (a backoff retry would only add latency to an ordinary race), with a
                # little jitter so that competing consumers stop colliding in lockstep.
                if attempt == CONFLICT_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
    except AlreadyProcessed:
        return Result(Outcome.DUPLICATE)
    except Exception as exc:
        log.warning(
            "consumer %s failed on %s %s: %r", consumer, event.type, event.event_id, exc
        )
        return Result(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
    return Result(Outcome.HANDLED)


async def deliver_batch(
    store: EventStore,
    schemas: EventSchemas,
    consumer: str,
    handlers: Mapping[str, Handler],
    events: Sequence[RecordedEvent],
    extra: Callable[[UnitOfWork], None],
) -> bool:
    """Handle several events in one unit of work (one commit). False when any of them is
    malformed, fails, conflicts or was processed already: nothing was written then, and the
    caller delivers them one by one to learn which, with the usual outcome for each."""
    started = time.perf_counter()
    try:
        events = _checked(schemas, events)
        for attempt in range(1, BATCH_CONFLICT_RETRIES + 1):
            try:
                await _handle_together(store, consumer, handlers, events, extra,
                                       guess=attempt == 1)
                break
            except ConcurrencyError:
                # Another writer moved an aggregate the batch loaded (a competing consumer,
                # or another consumer's handler on a hot stock item): redo the batch on
                # fresh state, as a single delivery would; then give up on batching it.
                if attempt == BATCH_CONFLICT_RETRIES:
                    return False
                await asyncio.sleep(random.uniform(0, 0.002 * attempt))
    except Exception:
        return False
    _count_handled(consumer, events, started)
    return True


def _checked(schemas: EventSchemas, events: Sequence[RecordedEvent]) -> list[RecordedEvent]:
    """Events upcast to their current schema and validated (MalformedMessage otherwise)."""
    current = [schemas.upcast(event) for event in events]
    for event in current:
        schemas.validate(event)
    return current


def _count_handled(consumer: str, events: Sequence[RecordedEvent], started: float) -> None:
    # Each event is charged its share of the batch: the histogram stays per delivery.
    share = (time.perf_counter() - started) / max(len(events), 1)
    for event in events:
        metrics.consumed(consumer, event.type, "handled", share)


async def deliver_concurrently(
    store: EventStore,
    schemas: EventSchemas,
    consumer: str,
    handlers: Mapping[str, Handler],
    events: Sequence[RecordedEvent],
    extra: Callable[[UnitOfWork], None],
    limit: int | asyncio.Semaphore,
) -> bool:
    """Like `deliver_batch` (one commit for all, False and nothing written if anything goes
    wrong), but up to `limit` handlers run at once (a semaphore: shared with other callers),
    each on a unit of work of its own: for handlers that wait on an outside system. Their
    writes then commit together. Two events of one partition key are never handled at once
    (nor in one such commit): False, so that the caller takes them one after the other."""
    started = time.perf_counter()
    keys = [key_of(event) for event in events]
    if len(set(keys)) < len(keys):
        return False
    slots = limit if isinstance(limit, asyncio.Semaphore) else asyncio.Semaphore(limit)

    async def handle(event: RecordedEvent) -> UnitOfWork:
        async with slots:
            uow = UnitOfWork(store, _causation(event, consumer))
            uow.trusts_cache = True  # its operations commit with the others' below
            uow.guesses_new = True  # a conflict sends each to `deliver`: its retry reads
            with tracing.handling(event, consumer), logs.delivering(event, consumer):
                uow.mark_processed(consumer, event.event_id)
                await handlers[event.type](event, uow)
            return uow

    try:
        events = _checked(schemas, events)
        # Every handler has finished before the caller falls back to one by one.
        units = await asyncio.gather(*(handle(event) for event in events),
                                     return_exceptions=True)
        if any(isinstance(unit, BaseException) for unit in units):
            return False
        async with store.transaction() as together:
            for unit in units:
                assert isinstance(unit, UnitOfWork)
                together.operations += unit.operations
                together.committed_hooks += unit.committed_hooks
                together.failed_hooks += unit.failed_hooks
                together.trusted.update(unit.trusted)
            extra(together)
    except Exception:
        return False
    _count_handled(consumer, events, started)
    return True


async def _handle_together(
    store: EventStore,
    consumer: str,
    handlers: Mapping[str, Handler],
    events: Sequence[RecordedEvent],
    extra: Callable[[UnitOfWork], None],
    *,
    guess: bool,
) -> None:
    async with store.transaction() as uow:
        uow.trusts_cache = True  # it commits: the inbox marks
        uow.guesses_new = guess
        for event in events:
            with tracing.handling(event, consumer), logs.delivering(event, consumer):
                uow.causation = _causation(event, consumer)
                uow.mark_processed(consumer, event.event_id)
                await handlers[event.type](event, uow)
        extra(uow)


def check_handlers(consumer: str, handlers: dict[str, Handler], schemas: EventSchemas) -> None:
    """Refuse at subscription time a handler for an event type nobody described."""
    if not handlers:
        raise ValueError(f"consumer {consumer!r} handles no event type")
    unknown = sorted(set(handlers) - schemas.types)
    if unknown:
        raise ValueError(f"consumer {consumer!r} handles unregistered event types {unknown}")
