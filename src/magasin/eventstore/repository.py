"""Load and save event-sourced aggregates through a unit of work."""

from __future__ import annotations

from typing import Generic, TypeVar

from magasin.eventstore.store import UnitOfWork
from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import NotFound
from magasin.shared.events import SCHEMAS
from magasin.shared.ids import stream_id
from magasin.shared.messages import EventSchemas, NewEvent

A = TypeVar("A", bound=Aggregate)


class Repository(Generic[A]):
    """Aggregates of one class. Within one unit of work an aggregate is loaded once (an
    identity map), so two handlers' changes to it in the same unit of work both count."""

    def __init__(self, cls: type[A], schemas: EventSchemas = SCHEMAS) -> None:
        self.cls = cls
        self.schemas = schemas

    def stream(self, ident: str) -> str:
        return stream_id(self.cls.stream_type, ident)

    async def find(self, uow: UnitOfWork, ident: str) -> A | None:
        key = self.stream(ident)
        cached = uow.identity.get(key)
        if cached is not None:
            assert isinstance(cached, self.cls)
            return cached
        events = await uow.read_stream(key)
        if not events:
            return None
        aggregate = self.cls.replay(
            ident, (self.schemas.validate(e) for e in events), events[-1].stream_version
        )
        uow.identity[key] = aggregate
        return aggregate

    async def get(self, uow: UnitOfWork, ident: str) -> A:
        aggregate = await self.find(uow, ident)
        if aggregate is None:
            raise NotFound(f"no {self.cls.stream_type} {ident}")
        return aggregate

    def save(self, uow: UnitOfWork, aggregate: A) -> None:
        """Stage the aggregate's pending events, expecting the version it was loaded at."""
        key = self.stream(aggregate.id)
        uow.identity[key] = aggregate
        if not aggregate.pending:
            return
        uow.append(
            key,
            [uow.new_event(self.schemas.name_of(type(e)), self.schemas.dump(e))
             for e in aggregate.pending],
            expected_version=aggregate.version,
        )
        aggregate.version += len(aggregate.pending)
        aggregate.pending = []


__all__ = ["NewEvent", "Repository"]
