"""The event bus port, its retry policy and the dead-letter record every adapter produces.

A consumer is a name plus an explicit registry `{event type: handler}`. A handler is a
plain `async def handler(event, uow)`: whatever it writes through `uow` commits in the
same database transaction as the consumer's inbox mark, so a redelivered event has no
second effect. A handler that raises is retried with exponential backoff without holding
up the events behind it, then dead-lettered with the reason; a message that cannot be
decoded or validated is dead-lettered at once. Dead letters are kept in the consumer's
event store (collection `bus.dead_letters`) whatever the adapter.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from magasin.eventstore.store import UnitOfWork
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

    def to_document(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "reason": self.reason,
            "attempts": self.attempts,
            "routing_key": self.routing_key,
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "event_id": self.event.event_id if self.event else None,
            "type": self.event.type if self.event else None,
            "body": self.body,
        }


class EventBus(ABC):
    """Port of the event bus. Adapters: `InProcessBus` (embedded), `RabbitMQBus`."""

    @abstractmethod
    def subscribe(self, consumer: str, handlers: Mapping[str, Handler]) -> None:
        """Register a consumer before `start()`; every handled type must have a schema."""

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
    async def dead_letters(self, consumer: str | None = None) -> list[DeadLetter]:
        """Dead letters recorded so far, oldest first, for one consumer or all."""
