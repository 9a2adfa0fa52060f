"""Distributed mode: the consumer that keeps a copy of every event in this service's store."""

from __future__ import annotations

from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.shared.events import SCHEMAS
from magasin.shared.messages import NewEvent, RecordedEvent

CONSUMER = "eventstore"


async def archive(event: RecordedEvent, uow: UnitOfWork) -> None:
    """Append the event to its stream at its own version, with its own id and envelope.

    Expecting the version before it makes an event that arrives ahead of its predecessor
    fail (the bus retries it later, once the gap is filled); a redelivered event is the
    store's idempotent no-op, its id being stored already."""
    uow.append(
        event.stream_id,
        [NewEvent(
            type=event.type, payload=event.payload, event_id=event.event_id,
            schema_version=event.schema_version, occurred_at=event.occurred_at,
            correlation_id=event.correlation_id, causation_id=event.causation_id,
            traceparent=event.traceparent, metadata=event.metadata,
        )],
        expected_version=event.stream_version - 1,
    )


def handlers() -> dict[str, Handler]:
    """Every event type the services publish."""
    return {type_name: archive for type_name in sorted(SCHEMAS.types)}
