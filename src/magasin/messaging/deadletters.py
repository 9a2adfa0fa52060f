"""Dead letters kept as documents in the consumer's event store, whatever the bus adapter."""

from __future__ import annotations

import logging
from datetime import datetime

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.messaging.bus import DeadLetter
from magasin.shared.errors import MalformedMessage
from magasin.shared.messages import decode_envelope

COLLECTION = "bus.dead_letters"
log = logging.getLogger("magasin.messaging.deadletters")


def record(uow: UnitOfWork, letter: DeadLetter) -> None:
    """Stage the dead letter in `uow`; logs the reason as an error (the alert signal)."""
    uow.put_document(COLLECTION, letter.id, letter.to_document())
    log.error(
        "dead-lettered %s for consumer %s after %d attempt(s): %s",
        letter.event.event_id if letter.event else "<undecodable message>",
        letter.consumer,
        letter.attempts,
        letter.reason,
        extra={"consumer": letter.consumer, "reason": letter.reason},
    )


async def list_letters(store: EventStore, consumer: str | None = None) -> list[DeadLetter]:
    where = {"consumer": consumer} if consumer is not None else None
    letters: list[DeadLetter] = []
    after: str | None = None
    while page := await store.find_documents(COLLECTION, where=where, after_key=after):
        for key, doc in page:
            letters.append(_from_document(key, doc))
        after = page[-1][0]
    letters.sort(key=lambda letter: letter.dead_lettered_at)
    return letters


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
    )
