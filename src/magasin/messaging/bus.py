"""The event bus port, its retry policy and the dead-letter record every adapter produces.

A consumer is a name plus an explicit registry `{event type: handler}`. A handler is a
plain `async def handler(event, uow)`: whatever it writes through `uow` commits in the
same database transaction as the consumer's inbox mark, so a redelivered event has no
second effect. A handler that raises is retried with exponential backoff without holding
up the events behind it, then dead-lettered with the reason; a message that cannot be
decoded or validated is dead-lettered at once. Dead letters are kept in the consumer's
event store (collection `bus.dead_letters`) whatever the adapter, where an operator lists
them, requeues one after a fix (delivered again to its consumer only, handled once) or
archives it (kept, no longer listed by default).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.shared.errors import Conflict
from magasin.shared.messages import RecordedEvent

Handler = Callable[[RecordedEvent, UnitOfWork], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`attempts` counts the first try. Delay after failed attempt n (1-based):
    initial_delay * multiplier**(n-1), capped at max_delay, +/- jitter (a fraction)."""

    attempts: int = 3
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if self.initial_delay < 0 or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError("retry delays must be >= 0, multiplier >= 1, 0 <= jitter < 1")

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.initial_delay * self.multiplier ** (failed_attempt - 1), self.max_delay)
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))

    @classmethod
    def covering(
        cls, seconds: float, initial_delay: float, multiplier: float, max_delay: float
    ) -> RetryPolicy:
        """A policy whose retries (without jitter) keep going for at least `seconds`."""
        if max_delay <= 0:
            raise ValueError("max_delay must be > 0")
        total, attempts = 0.0, 1
        while total < seconds:
            total += min(max(initial_delay, 1e-3) * multiplier ** (attempts - 1), max_delay)
            attempts += 1
        return cls(attempts, initial_delay, multiplier, max_delay)

    @property
    def levels(self) -> int:
        """Distinct delays a message can wait before a retry: after that many failed
        attempts the delay has reached `max_delay` (or no attempt is left)."""
        if self.initial_delay <= 0 or self.multiplier == 1:
            return min(1, self.attempts - 1)
        capped = 1 + max(0, math.ceil(math.log(self.max_delay / self.initial_delay,
                                               self.multiplier)))
        return min(self.attempts - 1, capped)


class DeadLetterStatus(StrEnum):
    """PENDING waits for an operator; REQUEUED went back to its consumer; ARCHIVED is kept
    as a permanent failure."""

    PENDING = "pending"
    REQUEUED = "requeued"
    ARCHIVED = "archived"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a consumer gave up on: why, after how many attempts, and what it was."""

    id: str
    consumer: str
    reason: str
    attempts: int
    routing_key: str
    dead_lettered_at: datetime
    event: RecordedEvent | None
    """The envelope, or None when the body could not be decoded (see `body`)."""
    body: str
    """The message as received (the envelope's JSON, or the undecodable bytes as text)."""
    status: DeadLetterStatus = DeadLetterStatus.PENDING
    requeues: int = 0
    """Requeues of this dead-lettering that could not reach the consumer (and were undone)."""
    updated_at: datetime | None = None
    """When an operator last requeued or archived it."""

    @property
    def type(self) -> str | None:
        return self.event.type if self.event else None

    def with_status(self, status: DeadLetterStatus, at: datetime) -> DeadLetter:
        return replace(self, status=status, updated_at=at)

    def to_document(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "reason": self.reason,
            "attempts": self.attempts,
            "routing_key": self.routing_key,
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "event_id": self.event.event_id if self.event else None,
            "type": self.type,
            "body": self.body,
            "status": str(self.status),
            "requeues": self.requeues,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One partition of one consumer: who consumes it and how much waits in it."""

    consumer: str
    partition: int | None
    """None: the queue of the batches shipped to a consumer of the whole log (`whole_log`,
    RabbitMQ), which one process at a time consumes."""
    owner: str | None
    """The process consuming it (None: nobody holds it right now); for the queue of
    shipped batches, how many processes wait on it (one at a time consumes)."""
    depth: int | None
    """Events waiting: ready messages of its queue (RabbitMQ), or log events past its
    lane's checkpoint (in-process). None when it could not be read."""

    @property
    def name(self) -> int | str:
        """The partition's number, or `log` for a queue of shipped batches."""
        return "log" if self.partition is None else self.partition


class EventBus(ABC):
    """Port of the event bus. Adapters: `InProcessBus` (embedded), `RabbitMQBus`.

    Both keep their dead letters in `store`, the consumer's event store, so listing and
    archiving them is the same code whatever the adapter; requeueing is the adapter's.
    """

    store: EventStore

    @abstractmethod
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
        """Register a consumer before `start()`; every handled type must have a schema.
        `retry` replaces the bus's retry policy for this consumer. By default the bus may
        handle several events in one unit of work; `concurrency=n` is for handlers that
        wait on something outside (a bank): up to n events at once, each in a unit of
        work of its own, so that one slow call does not hold up the others. `requires=tag`
        (see `tags`): the consumer gets only the events carrying that routing tag; the
        others never reach it (no handler run, no inbox mark, no broker delivery).
        `whole_log=True` is for a consumer that keeps a copy of every event (an archive,
        an audit): it gets them in the batches the publishers `ship`, all of a batch in
        one delivery and one unit of work, rather than one delivery per event; it lags by
        the publishers' shipping delay. An event of a batch that fails is retried, then
        dead-lettered, alone, like any other; types it has no handler for are skipped."""

    @abstractmethod
    async def start(self) -> None:
        """Connect, declare what is needed and start delivering to every subscriber."""

    @abstractmethod
    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking messages, give in-flight handlers `grace` seconds, then cancel them
        (a cancelled handler's message is delivered again later, its effects never half-done)."""

    @abstractmethod
    async def publish(self, events: Sequence[RecordedEvent]) -> None:
        """Make stored events durable on the bus; returns once the bus has them all."""

    @abstractmethod
    async def ship(self, events: Sequence[RecordedEvent]) -> None:
        """Make published events durable, as one batch, for the consumers of the whole log
        (`whole_log`); returns once the bus has it. The outbox relay ships what it
        published, gathered over a short delay."""

    async def dead_letters(
        self,
        consumer: str | None = None,
        *,
        type: str | None = None,
        reason: str | None = None,
        status: DeadLetterStatus | None = DeadLetterStatus.PENDING,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first: by default those waiting for a decision, of every
        consumer. `reason` matches a part of the reason (any case); `status` None = all."""
        from magasin.messaging import deadletters  # it imports this module

        return await deadletters.list_letters(
            self.store, consumer, type=type, reason=reason, status=status
        )

    async def dead_letter(self, letter_id: str) -> DeadLetter:
        """One dead letter by id, whatever its status; NotFound if there is none."""
        from magasin.messaging import deadletters

        return await deadletters.get(self.store, letter_id)

    @abstractmethod
    async def partition_states(self) -> list[PartitionState]:
        """Every partition of every subscribed consumer, by consumer then partition (then,
        for a consumer of the whole log on RabbitMQ, its queue of shipped batches)."""

    @abstractmethod
    async def requeue_dead_letter(self, letter_id: str) -> DeadLetter:
        """Deliver the message again to its own consumer only, with a fresh retry budget;
        returns the letter marked REQUEUED. The consumer's inbox makes it take effect once
        however often it is requeued. Conflict if it is requeued already (a second click),
        BusinessRuleViolation if its body cannot be decoded (requeueing cannot fix that:
        archive it), Unavailable if the broker cannot take it (it stays PENDING then)."""

    async def archive_dead_letter(self, letter_id: str) -> DeadLetter:
        """Keep the letter as a permanent failure, out of the default listing."""
        from magasin.messaging import deadletters

        return await deadletters.archive(self.store, letter_id)

    async def requeue_dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Requeue every PENDING dead letter of one consumer; returns those requeued."""
        done: list[DeadLetter] = []
        for letter in await self.dead_letters(consumer):
            if letter.event is None:
                continue  # undecodable: only an archive can settle it
            try:
                done.append(await self.requeue_dead_letter(letter.id))
            except Conflict:
                continue  # requeued meanwhile by someone else
        return done
