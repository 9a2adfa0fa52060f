"""Load and save event-sourced aggregates through a unit of work, with snapshots.

Every `snapshot_every` events (per store, see `configure_snapshots`) a load that brings an
aggregate past a multiple of that number saves a snapshot of the committed state it
reached; loads and point-in-time rebuilds then start from the latest snapshot that fits
instead of the first event. A snapshot whose `schema_version` is not the class's current
`snapshot_version`, or whose attributes are not the class's, is ignored.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from magasin.eventstore.store import EventStore, Snapshot, UnitOfWork
from magasin.shared.aggregate import Aggregate
from magasin.shared.errors import MagasinError, NotFound
from magasin.shared.events import SCHEMAS
from magasin.shared.ids import stream_id
from magasin.shared.messages import EventSchemas, NewEvent, RecordedEvent

A = TypeVar("A", bound=Aggregate)

CACHE_SIZE = 20_000
DEFAULT_SNAPSHOT_EVERY = 100
log = logging.getLogger("magasin.eventstore.repository")

_snapshot_every: weakref.WeakKeyDictionary[EventStore, int] = weakref.WeakKeyDictionary()


def configure_snapshots(store: EventStore, every: int) -> None:
    """Snapshot aggregates of `store` every `every` events (0: never take nor use one)."""
    if every < 0:
        raise ValueError("snapshot_every must be >= 0")
    _snapshot_every[store] = every


def snapshot_every(store: EventStore) -> int:
    return _snapshot_every.get(store, DEFAULT_SNAPSHOT_EVERY)


@dataclass(frozen=True, slots=True)
class Rebuilt(Generic[A]):
    """An aggregate rebuilt as it was at some point, and how it was rebuilt."""

    aggregate: A
    snapshot_version: int | None
    """Version of the snapshot it started from (None: from the first event)."""
    events_replayed: int
    last_event_at: datetime | None


class _StateCache:
    """Committed aggregate states of one store, most recently used last. A cached state is
    a starting point: a load reads every event stored after its version, so it is right
    even when other processes write the same streams; except when the store knows without
    a query that the stream is still at that version (`known_version`), or in a unit of
    work that trusts the cache (a delivery), which takes it as it is and checks its
    version at commit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.states: OrderedDict[str, Aggregate] = OrderedDict()
        self.due: dict[str, datetime] = {}
        """Cached states to snapshot at their next load, with their last event's time."""

    def get(self, key: str) -> Aggregate | None:
        state = self.states.get(key)
        if state is not None:
            self.states.move_to_end(key)
        return state

    def forget(self, key: str) -> None:
        self.states.pop(key, None)

    def put(self, key: str, state: Aggregate) -> None:
        self.states[key] = state
        self.states.move_to_end(key)
        if len(self.states) > self.size:
            evicted, _ = self.states.popitem(last=False)
            self.due.pop(evicted, None)


_caches: weakref.WeakKeyDictionary[EventStore, _StateCache] = weakref.WeakKeyDictionary()


def _cache_of(store: EventStore) -> _StateCache:
    cache = _caches.get(store)
    if cache is None:
        cache = _caches[store] = _StateCache(CACHE_SIZE)
    return cache


def _remember(
    store: EventStore, key: str, aggregate: Aggregate, loaded_at: int, event_at: datetime
) -> None:
    """After a commit, cache the state it stored, so that the next load of the aggregate
    reads no event it wrote itself. Changes still pending were not committed: skip those.
    A commit that took the aggregate past a multiple of `snapshot_every` leaves a snapshot
    due, which the next load takes from this state (as a load reading those events would)."""
    if aggregate.pending:
        return
    cache = _cache_of(store)
    cache.put(key, aggregate.clone())
    every = snapshot_every(store)
    if every and loaded_at // every < aggregate.version // every:
        cache.due[key] = event_at


class Repository(Generic[A]):
    """Aggregates of one class. Within one unit of work an aggregate is loaded once (an
    identity map), so two handlers' changes to it in the same unit of work both count."""

    def __init__(self, cls: type[A], schemas: EventSchemas = SCHEMAS) -> None:
        self.cls = cls
        self.schemas = schemas

    def stream(self, ident: str) -> str:
        return stream_id(self.cls.stream_type, ident)

    async def find(self, uow: UnitOfWork, ident: str, *, likely_new: bool = False) -> A | None:
        """The aggregate, None if its stream does not exist. `likely_new`: the caller
        creates it when it is missing and expects to (a handler of the message that starts
        it): in a unit of work that may guess (`UnitOfWork.guesses_new`), a stream this
        process knows nothing of is then taken for missing without a read."""
        key = self.stream(ident)
        cached = uow.identity.get(key)
        if cached is not None:
            assert isinstance(cached, self.cls)
            return cached
        store = uow.store
        cache = _cache_of(store)
        known = cache.get(key)
        if (known is None and likely_new and uow.guesses_new
                and store.known_version(key) is None and store.seen_version(key) is None):
            # Checked at commit: a save appends the stream expecting none, and a unit that
            # does not write it checks that it is still at 0 (`trust`). If it exists after
            # all, the commit fails (ConcurrencyError) and the delivery's retry reads it.
            uow.trust(key, 0)
            return None
        every = snapshot_every(store)
        aggregate: A | None = None
        events: list[RecordedEvent] | None = None
        if isinstance(known, self.cls):
            aggregate = known.clone()
            if (event_at := cache.due.pop(key, None)) is not None and every:
                await self._take_snapshot(store, known, event_at)
            if store.known_version(key) == aggregate.version:
                events = []  # the store knows nobody appended since the state cached here
            elif uow.trusts_cache and store.seen_version(key) in (None, aggregate.version):
                # No read: the state is as this process last committed it (a commit of its
                # own whose writer did not cache the result yet shows in seen_version: then
                # read). The commit fails if the stream moved since (another process, a
                # concurrent unit), and the retry then reads it, the state being forgotten.
                uow.trust(key, aggregate.version)
                uow.after_failure(lambda: cache.forget(key))
                uow.identity[key] = aggregate
                return aggregate
        elif every:
            snapshot, after_it = await store.read_latest(key)  # one round trip where it can
            aggregate = self._restore(snapshot, ident)
            if aggregate is not None or snapshot is None:
                events = after_it  # else an unusable snapshot: read from the start
        after = aggregate.version if aggregate is not None else 0
        if events is None:
            events = await uow.read_stream(key, from_version=after + 1)
        aggregate = self._advance(aggregate, ident, events)
        if aggregate is None:
            return None
        if events and every and after // every < aggregate.version // every:
            await self._take_snapshot(store, aggregate, events[-1].occurred_at)
        if events or known is None:
            cache.put(key, aggregate.clone())
        uow.identity[key] = aggregate
        return aggregate

    def _advance(
        self, aggregate: A | None, ident: str, events: list[RecordedEvent]
    ) -> A | None:
        """`aggregate` (a fresh one if None) brought up through `events`; None when there
        is neither a starting state nor any event: the stream does not exist."""
        if aggregate is None:
            if not events:
                return None
            aggregate = self.cls(ident)
        if events:
            aggregate.replay_more(
                (self.schemas.validate(e) for e in events), events[-1].stream_version
            )
        return aggregate

    def _restore(self, snapshot: Snapshot | None, ident: str) -> A | None:
        """The aggregate a snapshot holds, or None if there is none or it does not fit."""
        if snapshot is None:
            return None
        if snapshot.schema_version != self.cls.snapshot_version:
            log.info("ignoring snapshot of %s at version %d: state schema %d, class has %d",
                     snapshot.stream_id, snapshot.version, snapshot.schema_version,
                     self.cls.snapshot_version)
            return None
        try:
            return self.cls.from_snapshot(ident, snapshot.version, snapshot.state)
        except ValueError as exc:
            log.warning("ignoring snapshot of %s: %s", snapshot.stream_id, exc)
            return None

    async def _take_snapshot(self, store: EventStore, aggregate: A, event_at: datetime) -> None:
        snapshot = Snapshot(self.stream(aggregate.id), aggregate.version, aggregate.snapshot(),
                            self.cls.snapshot_version, event_at=event_at)
        try:
            await store.save_snapshot(snapshot)
        except MagasinError as exc:  # a snapshot only saves time: never fail a load for it
            log.warning("could not save a snapshot of %s: %r", snapshot.stream_id, exc)

    async def rebuild(
        self,
        store: EventStore,
        ident: str,
        *,
        version: int | None = None,
        until: datetime | None = None,
        use_snapshots: bool = True,
    ) -> Rebuilt[A] | None:
        """The aggregate as it was at `version`, or after its last event that occurred at or
        before `until` (the latest state without either), from the latest snapshot that
        precedes that point; None if it had no event by then. Reads committed state only
        and leaves the load cache alone."""
        key = self.stream(ident)
        aggregate = None
        if use_snapshots and snapshot_every(store):
            aggregate = self._restore(
                await store.load_snapshot(key, max_version=version, until=until), ident
            )
        start = aggregate.version if aggregate is not None else 0
        if version is not None and start >= version:
            events = []
        else:
            events = await store.read_stream(key, from_version=start + 1, to_version=version,
                                             until=until)
        aggregate = self._advance(aggregate, ident, events)
        if aggregate is None:
            return None
        return Rebuilt(aggregate, start or None, len(events),
                       events[-1].occurred_at if events else None)

    async def get(self, uow: UnitOfWork, ident: str) -> A:
        aggregate = await self.find(uow, ident)
        if aggregate is None:
            raise NotFound(f"no {self.cls.stream_type} {ident}")
        return aggregate

    def save(self, uow: UnitOfWork, aggregate: A) -> list[NewEvent]:
        """Stage the aggregate's pending events, expecting the version it was loaded at;
        returns them as staged (none when nothing changed), for what must be written with
        them in the same unit of work."""
        key = self.stream(aggregate.id)
        uow.identity[key] = aggregate
        if not aggregate.pending:
            return []
        names = [self.schemas.name_of(type(e)) for e in aggregate.pending]
        events = [uow.new_event(name, self.schemas.dump(e), self.schemas.version_of(name))
                  for name, e in zip(names, aggregate.pending, strict=True)]
        uow.append(key, events, expected_version=aggregate.version)
        loaded_at, store, event_at = aggregate.version, uow.store, events[-1].occurred_at
        uow.after_commit(lambda: _remember(store, key, aggregate, loaded_at, event_at))
        aggregate.version += len(aggregate.pending)
        aggregate.pending = []
        return events


__all__ = ["NewEvent", "Repository"]
