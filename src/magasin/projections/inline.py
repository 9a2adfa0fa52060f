"""Inline projections: applied in the unit of work that appends their events.

A projection marked `inline` keeps one document per stream, keyed so that only that
stream's events change it, and stores in it (`version`) the stream version it reflects.
`install` makes every unit of work of a store that appends such events with an expected
version apply them before it commits: the documents commit with the events, and no unit
of work of their own is needed. Writes to one stream are serialized by the expected
version, so the read-modify-write of its document is too.

A unit applies an append only on top of a document that reflects its stream exactly
(version = the append's expected version; absent for a new stream). Otherwise the
document lags (events appended without the inline projection: by another process, with
ANY, or after a rebuild swapped in collections built up to an older position) and the
unit leaves it alone: the runner, which keeps tailing the log, applies the events in
order. Hence an inline write never lands on a document the runner is bringing up to date,
and the runner never overwrites a newer inline document: for the runner to apply event v
the document is below v, so no unit can write v+1 or later until the runner has committed.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from magasin.eventstore.store import Append, EventStore, UnitOfWork
from magasin.projections.projection import (
    ABSENT,
    DocumentCache,
    Projection,
    ProjectionUnit,
    copy_doc,
    project,
)
from magasin.shared.messages import JsonDict, NewEvent, RecordedEvent

log = logging.getLogger("magasin.projections")

APPLIED_KEPT = 50_000
"""Event ids this process applied inline that it remembers, per projection."""


class Applied:
    """The events this process applied inline for one projection (committed), so that its
    runner passes them without reading their documents. `epoch` counts the runner's
    reloads: a reload may follow a rebuild's swap, which replaced the documents those
    events were applied to, so only events applied since the last reload are trusted."""

    def __init__(self) -> None:
        self.epoch = 0
        self.ids: OrderedDict[str, int] = OrderedDict()

    def add(self, event_ids: Sequence[str], epoch: int) -> None:
        for event_id in event_ids:
            self.ids[event_id] = epoch
        while len(self.ids) > APPLIED_KEPT:
            self.ids.popitem(last=False)

    def has(self, event_id: str) -> bool:
        """Applied inline since the runner last reloaded (its documents are the live ones)."""
        return self.ids.get(event_id, -1) == self.epoch

    def reloaded(self) -> None:
        self.epoch += 1
        self.ids.clear()


WRITTEN_KEPT = 5_000
"""Documents inline units remember having committed, per store: enough for the sales in
flight (past it the cache starts over, and a unit reads the document again)."""


@dataclass
class _Inline:
    """What this process knows of the inline projections of one store."""

    names: frozenset[str] = frozenset()
    """The projections `install` registered."""
    applied: dict[str, Applied] = field(default_factory=dict)
    written: DocumentCache = field(default_factory=lambda: DocumentCache(size=WRITTEN_KEPT))
    """The documents its inline units committed last."""


_stores: weakref.WeakKeyDictionary[EventStore, _Inline] = weakref.WeakKeyDictionary()


def applied(store: EventStore, projection: str) -> Applied:
    # Not setdefault with fresh defaults: each call built two objects, on every inline unit.
    known = _stores.get(store)
    if known is None:
        known = _stores.setdefault(store, _Inline())
    found = known.applied.get(projection)
    if found is None:
        found = known.applied.setdefault(projection, Applied())
    return found


def installed(store: EventStore, projection: Projection) -> bool:
    """Whether `projection` is applied inline on `store` in this process (`install`): its
    runner then only passes what the units of work applied; elsewhere (embedded mode, a
    tool) it projects like any other."""
    known = _stores.get(store)
    return projection.inline and known is not None and projection.name in known.names


class _Lagging(Exception):
    """The document does not reflect its stream up to the append: leave it to the runner."""


class InlineUnit(ProjectionUnit):
    """The document changes an inline projection makes for one append, read through and
    staged into the unit of work that appends."""

    def __init__(self, uow: UnitOfWork, expected_version: int, written: DocumentCache) -> None:
        super().__init__(uow.store)
        self.uow = uow
        self.expected_version = expected_version
        self.written = written

    async def get_document(self, collection: str, key: str) -> JsonDict | None:
        staged: JsonDict | None = self.changes.get((collection, key), ABSENT)
        if staged is not ABSENT:
            return staged
        if self.expected_version == 0:
            return None  # a new stream: no event ever made its document
        # A document this process committed at the version the append expects is the one
        # stored: another writer would have appended to the stream (and this unit's expected
        # version would fail its commit), and a document is a function of its stream's
        # events alone (a rebuild's swap puts in the same one, or one further behind).
        known = self.written.docs.get((collection, key))
        if known is not None and known.get("version") == self.expected_version:
            return copy_doc(known)
        doc = await self.uow.get_document(collection, key)
        if doc is None or doc.get("version") != self.expected_version:
            raise _Lagging
        return copy_doc(doc)


def _recorded(op: Append, index: int, event: NewEvent) -> RecordedEvent:
    """The event as it will be recorded, but for its global position (not known before
    the commit; inline handlers do not use it)."""
    assert op.expected_version is not None
    return RecordedEvent(
        event.event_id, event.type, event.schema_version, op.stream_id,
        op.expected_version + index + 1, 0, event.occurred_at, event.correlation_id,
        event.causation_id, event.traceparent, event.metadata, event.payload,
    )


async def apply_inline(projections: Sequence[Projection], uow: UnitOfWork) -> None:
    """Stage into `uow` what `projections` make of the events it appends (see module)."""
    appends = [op for op in uow.operations
               if isinstance(op, Append) and op.expected_version is not None]
    if not appends:
        return
    store = uow.store
    written = _stores.setdefault(store, _Inline()).written
    for projection in projections:
        handlers = projection.handlers
        for op in appends:
            assert op.expected_version is not None
            events = [_recorded(op, i, e) for i, e in enumerate(op.events) if e.type in handlers]
            if not events:
                continue
            unit = InlineUnit(uow, op.expected_version, written)
            try:
                await project(projection, events, unit)
            except _Lagging:
                continue
            except Exception:
                # The events still commit: the runner projects them, or stalls and says so.
                log.exception("inline projection %s failed on %s", projection.name,
                              op.stream_id)
                continue
            unit.stage(uow)
            uow.after_commit(functools.partial(written.merge, dict(unit.changes)))
            done = applied(store, projection.name)
            uow.after_commit(functools.partial(done.add, [e.event_id for e in events],
                                               done.epoch))


def install(store: EventStore, projections: Sequence[Projection]) -> None:
    """Apply the inline ones of `projections` in every unit of work of `store` that
    appends their events (once per store and process: the runtime's start-up)."""
    chosen = [p for p in projections if p.inline]
    if not chosen:
        return
    known = _stores.setdefault(store, _Inline())
    known.names |= {p.name for p in chosen}

    async def applier(uow: UnitOfWork) -> None:
        await apply_inline(chosen, uow)

    store.before_commit(applier)
