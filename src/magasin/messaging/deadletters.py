"""Dead letters kept as documents in the consumer's event store, whatever the bus adapter:
recording them (with the alert signal), listing, reading, archiving, and the bookkeeping of
a requeue that every adapter shares."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.messaging.bus import DeadLetter, DeadLetterStatus
from magasin.observability import metrics
from magasin.shared.clock import utcnow
from magasin.shared.errors import (
    AlreadyProcessed,
    BusinessRuleViolation,
    Conflict,
    MalformedMessage,
    NotFound,
)
from magasin.shared.messages import decode_envelope

COLLECTION = "bus.dead_letters"
REQUEUES = "bus.requeue"
"""Inbox name under which each requeue of a dead-lettering is marked: committing the mark
twice fails, so two operators requeueing at once cannot both succeed."""
log = logging.getLogger("magasin.messaging.deadletters")


class Changes:
    """Wakes the live listings of this process once a dead letter was recorded, requeued,
    archived or put back (after the commit). Whose letters changed is not said: a woken
    listing reads its letters again, so a wake for another runtime's letters costs one read."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    def notify(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    @contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        try:
            yield waiter
        finally:
            self._waiters.discard(waiter)


CHANGES = Changes()

# dispatch.deliver records a handler failure as "<ExceptionClass>: <message>"; every other
# reason is about a message its consumer could not decode or validate.
_FAILURE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): ")


def reason_kind(reason: str) -> str:
    """A label of few values for the reason (the failing exception's class, or
    `malformed`), so that the alert metric stays small whatever the messages say."""
    match = _FAILURE.match(reason)
    return match.group(1) if match else "malformed"


def record(uow: UnitOfWork, letter: DeadLetter) -> None:
    """Stage the dead letter in `uow`; once it commits, raise the alert signal: count it in
    `magasin_dead_letters_total` and log one error line with the reason."""
    uow.put_document(COLLECTION, letter.id, letter.to_document())
    uow.after_commit(lambda: _alert(letter))


async def handled(store: EventStore, letter: DeadLetter) -> bool | None:
    """For a requeued letter, whether its consumer has handled the message since (its
    inbox holds the event: the requeue took effect); None for any other letter."""
    if letter.status is not DeadLetterStatus.REQUEUED or letter.event is None:
        return None
    return await store.is_processed(letter.consumer, letter.event.event_id)


def _alert(letter: DeadLetter) -> None:
    CHANGES.notify()
    metrics.dead_lettered(letter.consumer, reason_kind(letter.reason))
    log.error(
        "dead-lettered %s for consumer %s after %d attempt(s): %s",
        letter.event.event_id if letter.event else "<undecodable message>",
        letter.consumer,
        letter.attempts,
        letter.reason,
        extra={"consumer": letter.consumer, "reason": letter.reason},
    )


async def list_letters(
    store: EventStore,
    consumer: str | None = None,
    *,
    type: str | None = None,
    reason: str | None = None,
    status: DeadLetterStatus | None = DeadLetterStatus.PENDING,
) -> list[DeadLetter]:
    where: dict[str, str | int | bool] = {}
    if consumer is not None:
        where["consumer"] = consumer
    if type is not None:
        where["type"] = type
    letters: list[DeadLetter] = []
    after: str | None = None
    while page := await store.find_documents(
        COLLECTION, where=where or None, after_key=after, limit=500
    ):
        for key, doc in page:
            letter = _from_document(key, doc)
            if status is not None and letter.status is not status:
                continue
            if reason is not None and reason.casefold() not in letter.reason.casefold():
                continue
            letters.append(letter)
        after = page[-1][0]
    letters.sort(key=lambda letter: letter.dead_lettered_at)
    return letters


async def get(store: EventStore, letter_id: str) -> DeadLetter:
    doc = await store.get_document(COLLECTION, letter_id)
    if doc is None:
        raise NotFound(f"no dead letter {letter_id!r}")
    return _from_document(letter_id, doc)


async def archive(store: EventStore, letter_id: str) -> DeadLetter:
    letter = await get(store, letter_id)
    if letter.status is DeadLetterStatus.ARCHIVED:
        return letter
    archived = letter.with_status(DeadLetterStatus.ARCHIVED, utcnow())
    async with store.transaction() as uow:
        uow.put_document(COLLECTION, letter.id, archived.to_document())
    CHANGES.notify()
    log.info("dead letter %s archived", letter.id)
    return archived


async def claim_requeue(
    store: EventStore,
    letter_id: str,
    extra: Callable[[UnitOfWork, DeadLetter], None] | None = None,
) -> DeadLetter:
    """Mark the letter REQUEUED, with `extra` (an adapter's redelivery) in the same unit of
    work; returns it as marked. A concurrent requeue of the same dead-lettering fails."""
    letter = await get(store, letter_id)
    if letter.event is None:
        raise BusinessRuleViolation(
            f"dead letter {letter.id} cannot be decoded, so requeueing cannot fix it: "
            "archive it instead"
        )
    if letter.status is DeadLetterStatus.REQUEUED:
        raise Conflict(f"dead letter {letter.id} is requeued already")
    requeued = letter.with_status(DeadLetterStatus.REQUEUED, utcnow())
    try:
        async with store.transaction() as uow:
            uow.put_document(COLLECTION, letter.id, requeued.to_document())
            # One mark per dead-lettering (its time) and per undone requeue of it: the
            # second of two concurrent requeues fails here, while a letter that failed
            # again after its requeue can be requeued again.
            uow.mark_processed(
                REQUEUES, f"{letter.id}@{letter.dead_lettered_at.isoformat()}#{letter.requeues}"
            )
            if extra is not None:
                extra(uow, letter)
    except AlreadyProcessed as exc:
        raise Conflict(f"dead letter {letter.id} is requeued already") from exc
    CHANGES.notify()
    log.info("dead letter %s requeued to consumer %s", letter.id, letter.consumer)
    return requeued


async def undo_requeue(store: EventStore, requeued: DeadLetter) -> None:
    """Put back PENDING a letter whose requeue could not reach the broker."""
    pending = replace(
        requeued, status=DeadLetterStatus.PENDING, requeues=requeued.requeues + 1,
        updated_at=utcnow(),
    )
    async with store.transaction() as uow:
        uow.put_document(COLLECTION, pending.id, pending.to_document())
    CHANGES.notify()


def _from_document(key: str, doc: dict[str, object]) -> DeadLetter:
    body = str(doc["body"])
    try:
        event = decode_envelope(body.encode())
    except MalformedMessage:
        event = None
    return DeadLetter(
        id=key,
        consumer=str(doc["consumer"]),
        reason=str(doc["reason"]),
        attempts=int(str(doc["attempts"])),
        routing_key=str(doc["routing_key"]),
        dead_lettered_at=datetime.fromisoformat(str(doc["dead_lettered_at"])),
        event=event,
        body=body,
        status=DeadLetterStatus(str(doc.get("status") or DeadLetterStatus.PENDING)),
        requeues=int(str(doc.get("requeues") or 0)),
        updated_at=datetime.fromisoformat(str(doc["updated_at"])) if doc.get("updated_at")
        else None,
    )
