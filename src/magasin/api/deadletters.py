"""HTTP routes to operate the dead letters of a runtime's consumers (seed 6.6.1): list,
read, requeue after a fix (one or a consumer's all), archive, and watch the listing live."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, status
from pydantic import BaseModel

from magasin.api.auth import STREAM_TOKEN_ALLOWED
from magasin.api.sse import EventStream
from magasin.messaging import deadletters
from magasin.messaging.bus import DeadLetter, DeadLetterStatus, EventBus
from magasin.messaging.deadletters import reason_kind
from magasin.shared.clock import utcnow

HEARTBEAT_S = 15.0
SETTLING_CHECK_S = 1.0
"""How often a live listing looks again while a requeued letter is not handled yet: the
consumer that handles it may run in another process, which cannot wake this one."""
SETTLING_FOR = timedelta(minutes=10)
"""A requeue not handled after this long is no longer waited for so closely."""


class DeadLetterSummary(BaseModel):
    id: str
    consumer: str
    type: str | None
    event_id: str | None
    correlation_id: str | None
    reason: str
    reason_kind: str
    attempts: int
    routing_key: str
    dead_lettered_at: datetime
    status: DeadLetterStatus
    updated_at: datetime | None
    handled: bool | None = None
    """Requeued letters: whether the consumer has handled the message since (its inbox
    holds the event). None for the others."""


class DeadLetterDetail(DeadLetterSummary):
    event: dict[str, Any] | None
    """The envelope as the consumer got it; None when it could not be decoded."""
    body: str
    """The message as received."""


class DeadLetterList(BaseModel):
    items: list[DeadLetterSummary]


class BulkRequeue(BaseModel):
    consumer: str
    requeued: list[str]
    """Ids of the letters sent back to the consumer."""


async def summary(bus: EventBus, letter: DeadLetter) -> DeadLetterSummary:
    return DeadLetterSummary(**_fields(letter),
                             handled=await deadletters.handled(bus.store, letter))


async def detail(bus: EventBus, letter: DeadLetter) -> DeadLetterDetail:
    event = letter.event
    envelope = (
        {
            "event_id": event.event_id, "type": event.type,
            "schema_version": event.schema_version, "stream_id": event.stream_id,
            "stream_version": event.stream_version, "global_position": event.global_position,
            "occurred_at": event.occurred_at.isoformat(),
            "correlation_id": event.correlation_id, "causation_id": event.causation_id,
            "traceparent": event.traceparent, "metadata": dict(event.metadata),
            "payload": dict(event.payload),
        }
        if event is not None else None
    )
    return DeadLetterDetail(**_fields(letter), event=envelope, body=letter.body,
                            handled=await deadletters.handled(bus.store, letter))


def _fields(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id, "consumer": letter.consumer, "type": letter.type,
        "event_id": letter.event.event_id if letter.event else None,
        "correlation_id": letter.event.correlation_id if letter.event else None,
        "reason": letter.reason, "reason_kind": reason_kind(letter.reason),
        "attempts": letter.attempts, "routing_key": letter.routing_key,
        "dead_lettered_at": letter.dead_lettered_at, "status": letter.status,
        "updated_at": letter.updated_at,
    }


StatusFilter = Literal["pending", "requeued", "archived", "all"]
Consumer = Annotated[str | None, Query(description="Only this consumer's.")]
Type = Annotated[str | None, Query(description="Only this event type.")]
Reason = Annotated[
    str | None, Query(description="Only those whose reason contains this (any case).")
]
StatusQuery = Annotated[
    StatusFilter | None,
    Query(alias="status", description="Any one status, or `all`; wins over archived."),
]
ListLimit = Annotated[int, Query(ge=1, le=1000, description="At most this many.")]


def status_filter(archived: bool, status_: StatusFilter | None) -> DeadLetterStatus | None:
    """`status` when given (`all` = any); else the archived letters or those pending."""
    if status_ is not None:
        return None if status_ == "all" else DeadLetterStatus(status_)
    return DeadLetterStatus.ARCHIVED if archived else DeadLetterStatus.PENDING


def router(bus: EventBus) -> APIRouter:
    """The routes over `bus`: in distributed mode each service's bus holds the dead letters
    of its own consumers, in embedded mode the one bus holds them all."""
    api = APIRouter(prefix="/api/dead-letters", tags=["dead letters"])

    async def listing(
        consumer: str | None, type: str | None, reason: str | None,
        status: DeadLetterStatus | None, limit: int,
    ) -> list[DeadLetterSummary]:
        letters = await bus.dead_letters(consumer, type=type, reason=reason, status=status)
        return [await summary(bus, letter) for letter in letters[:limit]]

    @api.get("")
    async def list_dead_letters(
        consumer: Consumer = None,
        type: Type = None,
        reason: Reason = None,
        archived: Annotated[
            bool, Query(description="The archived letters instead of those pending.")
        ] = False,
        status_: StatusQuery = None,
        limit: ListLimit = 100,
    ) -> DeadLetterList:
        """Dead letters oldest first; by default those waiting for a decision."""
        chosen = status_filter(archived, status_)
        return DeadLetterList(items=await listing(consumer, type, reason, chosen, limit))

    @api.get(
        "/live",
        response_class=EventStream,
        openapi_extra=STREAM_TOKEN_ALLOWED,
        responses={200: {"content": {"text/event-stream": {}}, "description":
                         "A `letters` event with the whole listing (as `GET` answers it) "
                         "first and each time it changes."}},
    )
    async def watch_dead_letters(
        consumer: Consumer = None,
        type: Type = None,
        reason: Reason = None,
        status_: StatusQuery = None,
        limit: ListLimit = 100,
        max_wait: Annotated[
            float, Query(alias="timeout", gt=0, le=86400, description="Seconds.")
        ] = 3600,
    ) -> EventStream:
        """Server-Sent Events: the listing, again whenever a letter is recorded, requeued,
        archived or, once requeued, handled by its consumer."""
        chosen = status_filter(False, status_)

        async def read() -> list[DeadLetterSummary]:
            return await listing(consumer, type, reason, chosen, limit)

        return EventStream(_live(read, max_wait))

    @api.post("/requeue", status_code=status.HTTP_202_ACCEPTED)
    async def requeue_consumer_dead_letters(
        consumer: Annotated[str, Query(description="Whose pending letters to requeue.")],
    ) -> BulkRequeue:
        """Send every pending letter of one consumer back to it (after a fix)."""
        done = await bus.requeue_dead_letters(consumer)
        return BulkRequeue(consumer=consumer, requeued=[letter.id for letter in done])

    @api.get("/{letter_id}")
    async def get_dead_letter(letter_id: str) -> DeadLetterDetail:
        """One dead letter with its message, whatever its status."""
        return await detail(bus, await bus.dead_letter(letter_id))

    @api.post("/{letter_id}/requeue", status_code=status.HTTP_202_ACCEPTED)
    async def requeue_dead_letter(letter_id: str) -> DeadLetterSummary:
        """Deliver the message again to its consumer only (after a fix); it takes effect
        once. 409 if it is requeued already, 422 if it cannot be decoded."""
        return await summary(bus, await bus.requeue_dead_letter(letter_id))

    @api.post("/{letter_id}/archive")
    async def archive_dead_letter(letter_id: str) -> DeadLetterSummary:
        """Keep it as a permanent failure, out of the default listing."""
        return await summary(bus, await bus.archive_dead_letter(letter_id))

    return api


def _settling(items: list[DeadLetterSummary]) -> bool:
    """Whether a requeue of the listing may still be handled (or fail again) any moment."""
    recent = utcnow() - SETTLING_FOR
    return any(
        item.handled is False and item.updated_at is not None and item.updated_at > recent
        for item in items
    )


async def _live(
    read: Callable[[], Awaitable[list[DeadLetterSummary]]], max_wait: float,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait
    sent: bytes | None = None
    with deadletters.CHANGES.watch() as changed:
        while (left := deadline - loop.time()) > 0:
            changed.clear()
            items = await read()
            body = orjson.dumps({"items": [i.model_dump(mode="json") for i in items]})
            if body != sent:
                yield b"event: letters\ndata: " + body + b"\n\n"
                sent = body
            wait = SETTLING_CHECK_S if _settling(items) else HEARTBEAT_S
            try:
                async with asyncio.timeout(min(wait, left)):
                    await changed.wait()
            except TimeoutError:
                if wait == HEARTBEAT_S:
                    yield b": keep-alive\n\n"
    yield b"event: timeout\ndata: {}\n\n"
