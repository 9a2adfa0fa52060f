"""HTTP routes to operate the dead letters of a runtime's consumers (seed 6.6.1): list,
read, requeue after a fix (one or a consumer's all), archive."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel

from magasin.messaging.bus import DeadLetter, DeadLetterStatus, EventBus
from magasin.messaging.deadletters import reason_kind


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


def summary(letter: DeadLetter) -> DeadLetterSummary:
    return DeadLetterSummary(**_fields(letter))


def detail(letter: DeadLetter) -> DeadLetterDetail:
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
    return DeadLetterDetail(**_fields(letter), event=envelope, body=letter.body)


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


def status_filter(archived: bool, status_: StatusFilter | None) -> DeadLetterStatus | None:
    """`status` when given (`all` = any); else the archived letters or those pending."""
    if status_ is not None:
        return None if status_ == "all" else DeadLetterStatus(status_)
    return DeadLetterStatus.ARCHIVED if archived else DeadLetterStatus.PENDING


def router(bus: EventBus) -> APIRouter:
    """The routes over `bus`: in distributed mode each service's bus holds the dead letters
    of its own consumers, in embedded mode the one bus holds them all."""
    api = APIRouter(prefix="/api/dead-letters", tags=["dead letters"])

    @api.get("")
    async def list_dead_letters(
        consumer: Annotated[str | None, Query(description="Only this consumer's.")] = None,
        type: Annotated[str | None, Query(description="Only this event type.")] = None,
        reason: Annotated[
            str | None, Query(description="Only those whose reason contains this (any case).")
        ] = None,
        archived: Annotated[
            bool, Query(description="The archived letters instead of those pending.")
        ] = False,
        status_: Annotated[
            StatusFilter | None,
            Query(alias="status", description="Any one status, or `all`; wins over archived."),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    ) -> DeadLetterList:
        """Dead letters oldest first; by default those waiting for a decision."""
        letters = await bus.dead_letters(
            consumer, type=type, reason=reason, status=status_filter(archived, status_)
        )
        return DeadLetterList(items=[summary(letter) for letter in letters[:limit]])

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
        return detail(await bus.dead_letter(letter_id))

    @api.post("/{letter_id}/requeue", status_code=status.HTTP_202_ACCEPTED)
    async def requeue_dead_letter(letter_id: str) -> DeadLetterSummary:
        """Deliver the message again to its consumer only (after a fix); it takes effect
        once. 409 if it is requeued already, 422 if it cannot be decoded."""
        return summary(await bus.requeue_dead_letter(letter_id))

    @api.post("/{letter_id}/archive")
    async def archive_dead_letter(letter_id: str) -> DeadLetterSummary:
        """Keep it as a permanent failure, out of the default listing."""
        return summary(await bus.archive_dead_letter(letter_id))

    return api
