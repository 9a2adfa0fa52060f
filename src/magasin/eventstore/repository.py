"""Load and save event-sourced aggregates through a unit of work."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Generic, TypeVar

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import NotFound
from magasin.shared.events import SCHEMAS
from magasin.shared.ids import stream_id
from magasin.shared.messages import EventSchemas, NewEvent

A = TypeVar("A", bound=Aggregate)

CACHE_SIZE = 20_000


class _StateCache:
    """Committed aggregate states of one store, most recently used last. A cached state is
    only a starting point: a load still reads every event stored after its version, so it
    is right even when other processes write the same streams."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.states: OrderedDict[str, Aggregate] = OrderedDict()

    def get(self, key: str) -> Aggregate | None:
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        return state

    def put(self, key: str, state: Aggregate) -> None:
        self.states[key] = state
        self.states.move_to_end(key)
        if len(self.states) > self.size:
            self.states.popitem(last=False)


_caches: weakref.WeakKeyDictionary[EventStore, _StateCache] = weakref.WeakKeyDictionary()


def _cache_of(store: EventStore) -> _StateCache:
    cache = _caches.get(store)
    if cache is None:
        cache = _caches[store] = _StateCache(CACHE_SIZE)
    return cache


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
        cache = _cache_of(uow.store)
        known = cache.get(key)
        after = known.version if isinstance(known, self.cls) else 0
        events = await uow.read_stream(key, from_version=after + 1)
        if isinstance(known, self.cls):
            aggregate = known.clone()
        elif events:
            aggregate = self.cls(ident)
        else:
            return None
        if events:
            aggregate.replay_more(
                (self.schemas.validate(e) for e in events), events[-1].stream_version
            )
            cache.put(key, aggregate.clone())
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
