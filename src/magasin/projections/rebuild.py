"""Rebuild a projection from position 0 into shadow collections, then swap them in.

Live reads keep using the live collections, and the live runner keeps updating them, while
the shadows are filled. The swap is one unit of work: project the events the live
checkpoint passed meanwhile into the shadows, replace each live collection by its shadow,
and move the checkpoint on — on condition that it did not move since it was read. If it
did (a live batch committed), the swap is abandoned, the shadows catch up and the swap is
tried again, so no live update can be lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from magasin.eventstore.store import EventStore
from magasin.projections.projection import (
    DocumentCache,
    Projection,
    ProjectionUnit,
    generation_name,
    project,
    shadow_of,
)
from magasin.shared.errors import ConcurrencyError, Conflict
from magasin.shared.messages import RecordedEvent

log = logging.getLogger("magasin.projections")

Progress = Callable[[int, int], None]
"""Called with (position reached, head position) after each batch."""

SWAP_DEADLINE_S = 60.0
"""How long a swap keeps retrying against a live projection that keeps moving."""


@dataclass(frozen=True, slots=True)
class RebuildReport:
    name: str
    events: int
    """Events of the log read (projected or skipped)."""
    position: int
    """The checkpoint the rebuilt collections were swapped in at."""
    swap_attempts: int


async def rebuild(
    store: EventStore,
    projection: Projection,
    *,
    progress: Progress | None = None,
    batch_size: int = 10_000,
    catch_up_gap: int | None = None,
) -> RebuildReport:
    """Rebuild `projection` from scratch and swap it in; see the module docstring."""
    rename = {c: shadow_of(c) for c in projection.collections}
    async with store.transaction() as uow:  # leftovers of an interrupted rebuild
        for shadow in rename.values():
            uow.clear_collection(shadow)
    cache = DocumentCache(complete=True)
    gap = catch_up_gap if catch_up_gap is not None else batch_size
    after = read = 0

    async def fill(until: int) -> None:
        """Project and commit (into the shadows) every event up to position `until`.

        A batch commits (in the store's writer) while the next one is read and projected:
        the cache already holds the batch's documents, so the next one never needs them
        from the store; were the cache ever cut short, the commit is awaited first."""
        nonlocal after, read
        writing: asyncio.Task[None] | None = None
        try:
            while after < until:
                page = await store.read_all(after=after, limit=min(batch_size, until - after))
                if not page:
                    break
                if writing is not None and not cache.complete:
                    await writing
                unit = ProjectionUnit(store, rename, cache)
                await project(projection, page, unit)
                if writing is not None:
                    await writing
                    writing = None
                if unit.changes:
                    unit.committed()
                    writing = asyncio.create_task(_commit(store, unit))
                after, read = page[-1].global_position, read + len(page)
                if progress is not None:
                    progress(after, max(until, after))
        finally:
            if writing is not None:
                await writing

    await fill(await store.last_position())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SWAP_DEADLINE_S
    attempt = 0
    while loop.time() < deadline:
        attempt += 1
        if attempt > 1:
            # Out of step with the live runner's commits, so that one of ours falls
            # between two of theirs.
            await asyncio.sleep(random.uniform(0, min(0.001 * attempt, 0.05)))
        live = await store.get_checkpoint(projection.checkpoint)
        generation = await store.get_checkpoint(generation_name(projection.name))
        if live - after > gap:
            await fill(live)  # far behind the live projection: catch up in batches first
            continue
        rest = await _events(store, after, live)
        unit = ProjectionUnit(store, rename, cache)
        await project(projection, rest, unit)
        position = max(after, rest[-1].global_position if rest else after)
        if await store.get_checkpoint(projection.checkpoint) != live:
            continue  # moved already: the commit would fail
        try:
            async with store.transaction() as uow:
                unit.stage(uow)
                for collection, shadow in rename.items():
                    uow.replace_collection(collection, shadow)
                uow.set_checkpoint(projection.checkpoint, position, expected=live)
                name = generation_name(projection.name)
                uow.set_checkpoint(name, generation + 1, expected=generation)
        except ConcurrencyError:
            log.info("projection %s moved during the swap; catching up (attempt %d)",
                     projection.name, attempt)
            continue
        read += len(rest)
        if progress is not None:
            progress(position, position)
        return RebuildReport(projection.name, read, position, attempt)
    raise Conflict(
        f"projection {projection.name} kept moving for {SWAP_DEADLINE_S:.0f} s: the rebuilt "
        "collections were not swapped in (the live ones are intact); try again"
    )


async def _commit(store: EventStore, unit: ProjectionUnit) -> None:
    async with store.transaction() as uow:
        unit.stage(uow)


async def _events(store: EventStore, after: int, until: int) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    while after < until:
        page = await store.read_all(after=after, limit=min(5000, until - after))
        if not page:
            break
        events += page
        after = page[-1].global_position
    return events
