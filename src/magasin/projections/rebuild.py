"""Rebuild a projection from position 0 into a shadow, then swap it in.

Live reads keep using the live collections, and the live runner keeps updating them, while
the shadow is filled. Once the shadow is within `catch_up_gap` events of the live
checkpoint, the rebuild fences the live runners off (the generation checkpoint turns
negative: their batches stop committing and they wait), projects the events the live
checkpoint passed meanwhile into the shadow, and swaps in one unit of work: the shadow
becomes the live collections, the checkpoint moves on and the generation is bumped — on
condition that neither moved since the fence. An earlier design retried the swap until no
live batch committed in between; under a steady stream of events it could lose that race
for a whole minute. A fence left by a rebuild that died is broken by the runners after
FENCE_TIMEOUT_S.

The shadow lives in memory while it fits (`memory_limit` documents): the swap then
clears the live collections and writes the rebuilt documents into them, sorted by key, in
its one unit of work. A shadow that outgrows the limit spills into shadow collections
(`<collection>~rebuild`), written batch by batch while the next batch is projected; the
swap then replaces each live collection by its shadow collection. Writing each document
once, in key order, at the swap costs a fraction of writing it at every batch that
changes it and then moving every row from the shadow's name to the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.projections.projection import (
    DocumentCache,
    Projection,
    ProjectionUnit,
    fenced,
    generation_name,
    live_generation,
    project,
    shadow_of,
)
from magasin.shared.errors import ConcurrencyError, Conflict
from magasin.shared.messages import JsonDict, RecordedEvent

log = logging.getLogger("magasin.projections")

Progress = Callable[[int, int], None]
"""Called with (position reached, head position) after each batch."""

SWAP_DEADLINE_S = 60.0
"""How long a rebuild keeps trying to catch up with, fence and swap in a live projection
that keeps moving."""

MEMORY_LIMIT = 200_000
"""Documents a rebuild keeps in memory before it spills them into shadow collections."""

Changes = Mapping[tuple[str, str], JsonDict | None]


@dataclass(frozen=True, slots=True)
class RebuildReport:
    name: str
    events: int
    """Events of the log read (projected or skipped)."""
    position: int
    """The checkpoint the rebuilt collections were swapped in at."""
    swap_attempts: int


class _Shadow:
    """The rebuilt documents: in memory (`pending`, also in the complete `cache`) until
    they outgrow `limit`, then in the shadow collections, with `pending` holding those
    not written yet. Keys name the shadow collections."""

    def __init__(self, store: EventStore, projection: Projection, limit: int) -> None:
        self.store = store
        self.rename = {c: shadow_of(c) for c in projection.collections}
        self.live = {shadow: c for c, shadow in self.rename.items()}
        self.limit = limit
        self.cache = DocumentCache(size=limit, complete=True)
        self.pending: dict[tuple[str, str], JsonDict | None] = {}
        self.spilled = False
        """Whether some documents are in the shadow collections already."""
        self.writing: asyncio.Task[None] | None = None

    def unit(self) -> ProjectionUnit:
        return ProjectionUnit(self.store, self.rename, self.cache)

    async def keep(self, unit: ProjectionUnit) -> None:
        """Take a projected batch's changes; spill them when they no longer fit.

        A spill commits (in the store's writer) while the next batch is read and
        projected: the cache holds the spilled documents, so that batch never needs them
        from the store; were the cache ever cut short, `ready` awaits the write first."""
        if not unit.changes:
            return
        self.pending.update(unit.changes)
        unit.committed()
        if len(self.pending) >= self.limit or not self.cache.complete:
            await self.flushed()
            spill, self.pending = self.pending, {}
            self.spilled = True
            self.writing = asyncio.create_task(_commit(self.store, spill))

    async def ready(self) -> None:
        """Before projecting: documents missing from the cache must be readable."""
        if self.writing is not None and not self.cache.complete:
            await self.flushed()

    async def flushed(self) -> None:
        if self.writing is not None:
            writing, self.writing = self.writing, None
            await writing

    def stage_swap(self, uow: UnitOfWork, unit: ProjectionUnit) -> None:
        """Stage the shadow (and `unit`'s changes, the last events) as the live
        collections."""
        changes = {**self.pending, **unit.changes}
        if self.spilled:
            _stage(uow, changes)
            for shadow, live in self.live.items():
                uow.replace_collection(live, shadow)
        else:
            for live in self.live.values():
                uow.clear_collection(live)
            for shadow, keys in _sorted_keys(changes).items():
                live = self.live[shadow]
                for key in keys:
                    body = changes[shadow, key]
                    if body is not None:
                        uow.put_document(live, key, body)
        for hook in unit.hooks:
            uow.after_commit(hook)


async def rebuild(
    store: EventStore,
    projection: Projection,
    *,
    progress: Progress | None = None,
    batch_size: int = 10_000,
    catch_up_gap: int | None = None,
    memory_limit: int = MEMORY_LIMIT,
) -> RebuildReport:
    """Rebuild `projection` from scratch and swap it in; see the module docstring."""
    shadow = _Shadow(store, projection, memory_limit)
    async with store.transaction() as uow:  # leftovers of an interrupted rebuild
        for collection in shadow.live:
            uow.clear_collection(collection)
    gap = catch_up_gap if catch_up_gap is not None else batch_size
    after = read = 0

    def read_from(start: int, until: int) -> asyncio.Future[list[RecordedEvent]]:
        return asyncio.ensure_future(
            store.read_all(after=start, limit=min(batch_size, until - start)))

    async def fill(until: int) -> None:
        """Project every event up to position `until` into the shadow. The next page is
        read while this one is projected (a database server reads it meanwhile)."""
        nonlocal after, read
        reading = read_from(after, until) if after < until else None
        try:
            while reading is not None:
                page = await reading
                reading = None
                if not page:
                    break
                end = page[-1].global_position
                if end < until:
                    reading = read_from(end, until)
                await shadow.ready()
                unit = shadow.unit()
                await project(projection, page, unit)
                await shadow.keep(unit)
                _settled()
                after, read = end, read + len(page)
                if progress is not None:
                    progress(after, max(until, after))
        finally:
            if reading is not None:
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
            await shadow.flushed()

    with _collector_spares_the_shadow():
        await fill(await store.last_position())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SWAP_DEADLINE_S
        attempt = 0
        name = generation_name(projection.name)
        while loop.time() < deadline:
            attempt += 1
            live = await store.get_checkpoint(projection.checkpoint)
            if live - after > gap:
                await fill(live)  # far behind the live projection: catch up in batches
                continue
            # Fence the live runners off (see `fenced`): from here the live checkpoint
            # stands still until the swap moves it.
            generation = await live_generation(store, projection.name, 0.05)
            fence = fenced(generation)
            try:
                async with store.transaction() as uow:
                    uow.set_checkpoint(name, fence, expected=generation)
            except ConcurrencyError:
                continue  # another rebuild swapped meanwhile
            try:
                live = await store.get_checkpoint(projection.checkpoint)
                rest = await _events(store, after, live)
                unit = shadow.unit()
                await project(projection, rest, unit)
                position = max(after, rest[-1].global_position if rest else after)
                async with store.transaction() as uow:
                    shadow.stage_swap(uow, unit)
                    uow.set_checkpoint(projection.checkpoint, position, expected=live)
                    uow.set_checkpoint(name, generation + 1, expected=fence)
            except ConcurrencyError:
                # A runner broke a fence it took for abandoned (FENCE_TIMEOUT_S).
                log.info("projection %s moved during the swap; catching up (attempt %d)",
                         projection.name, attempt)
                continue
            except BaseException:
                await _lift(store, name, fence, generation)
                raise
            read += len(rest)
            if progress is not None:
                progress(position, position)
            return RebuildReport(projection.name, read, position, attempt)
    raise Conflict(
        f"projection {projection.name} kept moving for {SWAP_DEADLINE_S:.0f} s: the rebuilt "
        "collections were not swapped in (the live ones are intact); try again"
    )


async def _lift(store: EventStore, name: str, fence: int, generation: int) -> None:
    """Give the live runners their projection back after a failed swap (the live
    collections are intact: the swap is one unit of work)."""
    with contextlib.suppress(Exception):
        async with store.transaction() as uow:
            uow.set_checkpoint(name, generation, expected=fence)


@contextlib.contextmanager
def _collector_spares_the_shadow() -> Iterator[None]:
    """Keep the cyclic garbage collector off the shadow's documents while rebuilding.

    The shadow is a growing heap of long-lived dicts and lists (hundreds of thousands),
    and every full collection walked all of them: a third of a rebuild's time, measured.
    After each batch `_settled` freezes what is alive (gc.freeze: the collector skips it;
    reference counting still frees it), so collections see only what the next batch
    allocates; on the way out everything is handed back to the collector."""
    global _rebuilding
    _rebuilding += 1
    try:
        yield
    finally:
        _rebuilding -= 1
        if not _rebuilding:
            gc.unfreeze()


_rebuilding = 0
"""Rebuilds running in this process (the last one to end unfreezes)."""


def _settled() -> None:
    gc.freeze()


def _sorted_keys(changes: Changes) -> dict[str, list[str]]:
    """The keys of `changes` by collection, in order: a B-tree takes sorted keys best (and
    sorting strings is several times cheaper than sorting the (collection, key) pairs)."""
    keys: dict[str, list[str]] = {}
    for collection, key in changes:
        keys.setdefault(collection, []).append(key)
    for listed in keys.values():
        listed.sort()
    return keys


def _stage(uow: UnitOfWork, changes: Changes) -> None:
    """Stage document changes, in key order."""
    for collection, keys in _sorted_keys(changes).items():
        for key in keys:
            body = changes[collection, key]
            if body is None:
                uow.delete_document(collection, key)
            else:
                uow.put_document(collection, key, body)


async def _commit(store: EventStore, changes: Changes) -> None:
    async with store.transaction() as uow:
        _stage(uow, changes)


async def _events(store: EventStore, after: int, until: int) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    while after < until:
        page = await store.read_all(after=after, limit=min(5000, until - after))
        if not page:
            break
        events += page
        after = page[-1].global_position
    return events
