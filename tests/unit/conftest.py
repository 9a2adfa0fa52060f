"""Unit tests of a context drive its handlers with a real (temporary) SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore
from magasin.messaging.bus import Handler
from magasin.messaging.dispatch import Result, deliver
from magasin.shared.events import SCHEMAS
from magasin.shared.ids import stream_id
from magasin.shared.messages import NewEvent, RecordedEvent


class Harness:
    """Publishes integration events as another service would, delivers them to handlers
    exactly like a bus does, and reads back what the handlers emitted."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    async def given(self, aggregate: str, ident: str, *payloads: Any,
                    correlation_id: str | None = None) -> list[RecordedEvent]:
        events = [
            NewEvent(type(p).__name__, SCHEMAS.dump(p), correlation_id=correlation_id)
            for p in payloads
        ]
        return await self.store.append(stream_id(aggregate, ident), events)

    async def deliver(
        self, consumer: str, handlers: Mapping[str, Handler], event: RecordedEvent
    ) -> Result:
        return await deliver(self.store, SCHEMAS, consumer, handlers[event.type], event)

    async def emitted(self, *types: type) -> list[Any]:
        """Payload objects of every stored event of these types, in log order."""
        names = {t.__name__ for t in types}
        out: list[Any] = []
        after = 0
        while page := await self.store.read_all(after=after, limit=1000):
            out += [SCHEMAS.validate(e) for e in page if not names or e.type in names]
            after = page[-1].global_position
        return out


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with SqliteEventStore(tmp_path / "unit.db") as store:
        yield Harness(store)
