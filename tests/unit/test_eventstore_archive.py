"""The event store service's archive consumer: a faithful copy of every event it receives."""

from __future__ import annotations

from pathlib import Path

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore_service.archive import CONSUMER, handlers
from magasin.messaging.dispatch import Outcome
from magasin.shared.events import StockAdded
from tests.unit.conftest import Harness


async def test_events_are_archived_with_their_id_stream_and_version_once(
    harness: Harness, tmp_path: Path
) -> None:
    published = await harness.given("stock", "s1:p1", StockAdded("s1", "p1", 5),
                                    StockAdded("s1", "p1", 2), correlation_id="tx-1")
    async with SqliteEventStore(tmp_path / "archive.db") as archive:
        archivist = Harness(archive)
        ahead = await archivist.deliver(CONSUMER, handlers(), published[1])
        outcomes = [(await archivist.deliver(CONSUMER, handlers(), e)).outcome
                    for e in (*published, published[0])]
        kept = await archive.read_stream("stock-s1:p1")

    assert ahead.outcome is Outcome.FAILED  # its predecessor is missing: retried later
    assert outcomes == [Outcome.HANDLED, Outcome.HANDLED, Outcome.DUPLICATE]
    assert [(e.event_id, e.stream_version, e.correlation_id, e.occurred_at) for e in kept] == [
        (e.event_id, e.stream_version, e.correlation_id, e.occurred_at) for e in published]


def test_the_archive_subscribes_to_every_published_event_type() -> None:
    from magasin.shared.events import SCHEMAS

    assert set(handlers()) == set(SCHEMAS.types)
