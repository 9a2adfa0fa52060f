"""Unit tests of a context drive its handlers with a real (temporary) SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore
from magasin.messaging.bus import Handler
from magasin.messaging.dispatch import Result, deliver
from magasin.projections import catch_up
from magasin.projections.catalog import all_projections
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

    async def read_model(self, collection: str, key: str) -> dict[str, Any] | None:
        """A read-model document once every projection has caught up with the log."""
        await project_all(self.store)
        return await self.store.get_document(collection, key)

    async def emitted(self, *types: type) -> list[Any]:
        """Payload objects of every stored event of these types, in log order."""
        names = {t.__name__ for t in types}
        out: list[Any] = []
        after = 0
        while page := await self.store.read_all(after=after, limit=1000):
            out += [SCHEMAS.validate(e) for e in page if not names or e.type in names]
            after = page[-1].global_position
        return out


async def project_all(store: EventStore) -> None:
    """Bring every projection up to the head of the log, as a running service soon would."""
    for projection in all_projections().values():
        await catch_up(store, projection)


class ProjectingTransport(httpx.AsyncBaseTransport):
    """An app's routes with the projections caught up after each request, so a test can
    read what it just wrote (a running service gets there a moment later)."""

    def __init__(self, app: Any, store: EventStore) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.store = store

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await project_all(self.store)  # what the fixtures wrote
        response = await self.inner.handle_async_request(request)
        await project_all(self.store)
        return response


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with SqliteEventStore(tmp_path / "unit.db") as store:
        yield Harness(store)
