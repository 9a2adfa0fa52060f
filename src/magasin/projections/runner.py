"""Keeps projections up to date: tails the service's own log from each checkpoint.

Each batch of events is projected in memory, then its documents and the new checkpoint
commit in one unit of work. The checkpoint is set conditionally (it must still be where
this runner read it, and no rebuild swapped the collections meanwhile), so two processes
of one service running the same projection, or a rebuild's swap, can never lose or
overwrite an update: the loser reloads its checkpoint and goes on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from magasin.eventstore.store import EventStore, UnitOfWork
from magasin.eventstore.window import LogWindow
from magasin.projections.inline import applied, installed
from magasin.projections.projection import (
    DocumentCache,
    Projection,
    ProjectionUnit,
    generation_name,
    live_generation,
    project,
)
from magasin.shared.errors import ConcurrencyError
from magasin.shared.messages import RecordedEvent

log = logging.getLogger("magasin.projections")

Reader = Callable[[int, int], Awaitable[list[RecordedEvent]]]

LAZY_MOVE_MAX_S = 5.0
"""Longest a projection leaves its checkpoint behind events it ignores while the log keeps
moving: it moves once the log is quiet for a poll, or after this. An inline projection's
checkpoint, behind events applied inline, moves only after this: its every sale would
otherwise cost a commit of its own again (the log goes quiet between sales)."""

FRESH_TIMEOUT_S = 2.0
"""Longest a request waits in `fresh` for a projection to reach the head before it reads
what is there."""

ELSEWHERE_READ_LIMIT = 5_000
"""Positions past its failed batch a runner reads to tell `Projection.elsewhere` what
another process projected; further behind (a restart), it tells nothing."""

_running: weakref.WeakKeyDictionary[EventStore, dict[str, _Tail]] = (
    weakref.WeakKeyDictionary()
)


def running(store: EventStore) -> dict[str, Projection]:
    """The projections some runner keeps up to date on this store, by name."""
    return {name: tail.projection for name, tail in _running.get(store, {}).items()}


def status_of(store: EventStore, name: str) -> str | None:
    tail = _running.get(store, {}).get(name)
    return None if tail is None else tail.status


async def fresh(store: EventStore, name: str, timeout: float = FRESH_TIMEOUT_S) -> bool:
    """Wait until this process's runner of projection `name` has projected the log up to
    its head as of now, hurrying it out of a linger: a request that must show what was
    committed before it came (a client reading the stock a sale it saw end moved) calls it
    before reading the projection's documents. True at once when no runner of it runs in
    this process (nothing to wait for here); False when it has not within `timeout` s (a
    stalled or paused projection): the caller then reads what there is."""
    tail = _running.get(store, {}).get(name)
    if tail is None:
        return True
    head = store.known_head()
    if head is None:
        head = await store.last_position()
    if tail.position >= head:
        return True
    tail.readers += 1
    try:
        async with asyncio.timeout(timeout):
            while tail.position < head:
                tail.moved.clear()
                tail.hurry.set()
                tail.wake()  # it may wait for an event it handles, past events it ignores
                await tail.moved.wait()
        return True
    except TimeoutError:
        return False
    finally:
        tail.readers -= 1


def position_of(store: EventStore, name: str) -> int:
    """The position a runner of this process has projected `name` up to (0: none runs);
    its stored checkpoint may trail it (see LAZY_MOVE_MAX_S)."""
    tail = _running.get(store, {}).get(name)
    return 0 if tail is None else tail.position


@dataclass
class _Tail:
    projection: Projection
    status: str = "starting"
    """starting, running, caught_up, paused (a rebuild's swap), failing or stopped."""
    position: int = 0
    """The log position this process has projected up to (in memory; the stored
    checkpoint may trail it over ignored events)."""
    generation: int = 0
    """The generation of the documents it projected into (see generation_name)."""
    reload: bool = False
    """Set when a rebuild swapped the documents in under it: go on from the checkpoint."""
    readers: int = 0
    """Requests waiting in `fresh` for it to reach the head: it does not linger meanwhile."""
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by `fresh`: ends a linger."""
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    """Set each time `position` is brought up to date."""
    wake: Callable[[], None] = lambda: None
    """Wakes it when it waits for the commit of an event it handles (the runner's window)."""


class ProjectionRunner:
    """Runs `projections` over `store`'s log until stopped. They follow `window`, a window
    of the log's tail (the in-process bus shares its own), which reads the log and wakes
    each projection at the commits of the events it handles; without one they read with
    `read` (store.read_all by default) and wake at every commit.

    With `linger` (seconds), a projection that is not inline waits that long after each
    batch it commits before it reads again, so that the events of the sales meanwhile go in
    its next commit: at most one commit per `linger` under load, none added when idle (the
    first events after a quiet spell are projected at once, and a backlog is read on without
    waiting), and its documents trail the log by up to `linger` more. The runtime sets it
    (MAGASIN_PROJECTION_LINGER_S). With `foreground_linger` False (embedded, where a client
    reads the other read models right after a sale), only the `background` ones linger."""

    def __init__(
        self,
        store: EventStore,
        projections: Sequence[Projection],
        *,
        window: LogWindow | None = None,
        read: Reader | None = None,
        page_size: int = 500,
        poll_interval: float = 0.5,
        linger: float = 0.0,
        foreground_linger: bool = True,
    ) -> None:
        if linger < 0:
            raise ValueError("linger must be >= 0 seconds")
        names = [p.name for p in projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projection names repeat: {names}")
        self.store = store
        self.projections = list(projections)
        self._window = window
        self._read = read or (window.read if window is not None else
                              lambda after, limit: store.read_all(after=after, limit=limit))
        self._page = page_size
        self._poll = poll_interval
        self._linger = linger
        self._foreground_linger = foreground_linger
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._tails = {p.name: _Tail(p) for p in projections}

    async def start(self) -> None:
        self._stopping = False
        _running.setdefault(self.store, {}).update(self._tails)
        for tail in self._tails.values():
            if self._window is not None:
                tail.wake = self._window.wake_all
            self._tasks.append(
                asyncio.create_task(self._run(tail), name=f"projection:{tail.projection.name}")
            )

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        mine = _running.get(self.store, {})
        for name, tail in self._tails.items():
            tail.status = "stopped"
            if mine.get(name) is tail:
                del mine[name]

    async def reach(self, position: int, timeout: float) -> bool:
        """Wait until every projection has projected the log up to `position` (what a
        client reads then includes it); False if one has not within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while any(t.position < position for t in self._tails.values()):
                if loop.time() >= deadline:
                    return False
                if self._window is not None:
                    # A projection that handles none of the events up to `position` waits
                    # for one it handles: wake it to pass them now.
                    self._window.wake_all()
                await asyncio.sleep(0.02)
            if not await self._swapped_under():
                return True

    async def _swapped_under(self) -> bool:
        """Whether a rebuild swapped in the documents of an inline projection that passed
        events without committing (found applied, to the documents the swap replaced):
        its runner then goes back to the checkpoint the swap set."""
        swapped = False
        for tail in self._tails.values():
            name = generation_name(tail.projection.name)
            if (installed(self.store, tail.projection)
                    and await self.store.get_checkpoint(name) != tail.generation):
                tail.reload, tail.position, swapped = True, 0, True
        return swapped

    async def _position(self, tail: _Tail) -> tuple[int, int]:
        projection = tail.projection

        def paused() -> None:
            tail.status = "paused"  # a rebuild is swapping its collections in

        generation = await live_generation(self.store, projection.name, self._poll, paused)
        return await self.store.get_checkpoint(projection.checkpoint), generation

    async def _run(self, tail: _Tail) -> None:
        """Tail the log. Only batches with events the projection handles commit; a run of
        events it ignores moves the checkpoint lazily, once the log has been quiet for a
        poll interval or LAZY_MOVE_MAX_S after the last move (replaying ignored events
        after a crash costs nothing)."""
        projection = tail.projection
        inline = installed(self.store, projection)
        lingers = self._linger > 0 and not inline and (
            self._foreground_linger or projection.background)
        clock = asyncio.get_running_loop().time
        failures = 0
        position: tuple[int, int] | None = None
        saved = 0  # the checkpoint as stored
        saved_at = clock()
        read_at = clock()  # when a read last found events
        cache = DocumentCache(size=20_000)
        while not self._stopping:
            page: list[RecordedEvent] = []
            try:
                if tail.reload:
                    tail.reload, position = False, None
                if position is None:
                    cache = DocumentCache(size=20_000)  # only this runner's commits are in it
                    if inline:
                        applied(self.store, projection.name).reloaded()
                    position = await self._position(tail)
                    saved, saved_at = position[0], clock()
                    tail.generation = position[1]
                after, generation = position
                tail.position = after
                tail.moved.set()
                page = await self._read(after, self._page)
                if not page:
                    now = clock()
                    quiet = not inline and now - max(saved_at, read_at) >= self._poll
                    if after > saved and (quiet or now - saved_at >= LAZY_MOVE_MAX_S):
                        await move_checkpoint(self.store, projection, saved, after, generation)
                        saved, saved_at = after, clock()
                        continue
                    tail.status = "caught_up"
                    await self._wait(after, projection)
                    continue
                tail.status = "running"
                read_at = clock()
                end = page[-1].global_position
                mine = [e for e in page if e.type in projection.handlers]
                if mine and inline:
                    done = applied(self.store, projection.name)
                    mine = [e for e in mine if not done.has(e.event_id)]
                    if mine and await self._check_inline(projection, mine, saved, end,
                                                         generation):
                        saved, saved_at = end, clock()
                elif mine:
                    await apply_batch(self.store, projection, mine, saved, generation,
                                      through=end, cache=cache)
                    saved, saved_at = end, clock()
                position = (end, generation)
                failures = 0
                if mine and lingers and len(page) < self._page and not tail.readers:
                    # Caught up with a commit: let the next sales' events gather (a full
                    # page is a backlog, read on at once), unless a request hurries it.
                    tail.hurry.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._linger):
                            await tail.hurry.wait()
            except ConcurrencyError:
                # A swap or another process moved it (committed a batch, or moved it over
                # events ignored here while this runner's move failed): go on from there.
                lost, position = position, None
                if projection.elsewhere is not None and lost is not None:
                    with contextlib.suppress(Exception):
                        position = await self._projected_elsewhere(projection, lost, page)
                        if position is not None:
                            saved, saved_at = position[0], clock()
                            cache = DocumentCache(size=20_000)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A broken event or a storage outage: the projection stalls (its lag shows
                # it) and tries again, rather than skipping what it could not project.
                failures += 1
                tail.status = "failing"
                position = None
                log.exception("projection %s failed; retrying", projection.name)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))

    async def _check_inline(
        self, projection: Projection, events: list[RecordedEvent], after: int, end: int,
        generation: int,
    ) -> bool:
        """Apply to an inline projection's documents the `events` they lack (appended
        without it) and commit those with the checkpoint; events they reflect already
        (applied inline by another process) change nothing and commit nothing: the
        checkpoint then moves lazily, as over ignored events. Its documents are read, not
        cached: inline units of work write them too. True if it committed."""
        unit = ProjectionUnit(self.store)
        await project(projection, events, unit)
        if unit.changes or unit.hooks:
            await commit_batch(self.store, projection, unit, after, end, generation)
            return True
        if projection.elsewhere is not None:
            with contextlib.suppress(Exception):
                await projection.elsewhere(self.store, events)
        return False

    async def _wait(self, after: int, projection: Projection) -> None:
        if self._window is None:
            await self.store.wait_for_events(after, self._poll)
        else:
            await self._window.wait(after, self._poll, projection.handlers)

    async def _projected_elsewhere(
        self, projection: Projection, lost: tuple[int, int], page: list[RecordedEvent],
    ) -> tuple[int, int] | None:
        """Hand `projection.elsewhere` what another process committed past this runner's
        position when its commit failed (`lost`, with the batch `page`; no page when a
        lazy checkpoint move failed): the page, and the rest up to the new checkpoint (read
        only when a few pages away). Returns the position told up to, where the runner goes
        on and the checkpoint it expects there (None: reload it)."""
        assert projection.elsewhere is not None
        generation = lost[1]
        name = generation_name(projection.name)
        if await self.store.get_checkpoint(name) != generation:
            return None  # a rebuild swapped the documents in: no single change to tell
        now = await self.store.get_checkpoint(projection.checkpoint)
        events = [e for e in page if e.global_position <= now]
        end = page[-1].global_position if page else lost[0]
        if now - end > ELSEWHERE_READ_LIMIT:
            return None
        while end < now:
            more = await self._read(end, min(self._page, now - end))
            if not more:
                # The read stopped short of the checkpoint (a hole this process has not
                # judged yet, or a window trusting a read that found the end a moment
                # before another process's commit): what lies past `end` is not told yet.
                # Going on from `end` and expecting the checkpoint there, the runner's next
                # commit fails again and tells it then; going on from `now` skipped it.
                if events:
                    await projection.elsewhere(self.store, events)
                return end, generation
            events.extend(e for e in more if e.global_position <= now)
            end = more[-1].global_position
        if events:
            await projection.elsewhere(self.store, events)
        return now, generation


async def apply_batch(
    store: EventStore,
    projection: Projection,
    events: list[RecordedEvent],
    after: int,
    generation: int,
    *,
    through: int | None = None,
    cache: DocumentCache | None = None,
) -> None:
    """Project `events` (those after `after` up to `through`, default the last of them)
    and commit their documents with the checkpoint; ConcurrencyError if the checkpoint or
    generation moved meanwhile. `cache` holds the documents of this runner's earlier
    commits (it is the only writer while the checkpoint holds)."""
    unit = ProjectionUnit(store, cache=cache)
    await project(projection, events, unit)
    await commit_batch(store, projection, unit, after,
                       events[-1].global_position if through is None else through, generation)


async def commit_batch(
    store: EventStore, projection: Projection, unit: ProjectionUnit, after: int,
    through: int, generation: int,
) -> None:
    """Commit a projected batch's documents with the checkpoint moved from `after` to
    `through`; ConcurrencyError if the checkpoint or generation moved meanwhile."""
    async with store.transaction() as uow:
        unit.stage(uow)
        _stage_checkpoint(uow, projection, after, through, generation)
    unit.committed()


async def move_checkpoint(
    store: EventStore, projection: Projection, after: int, position: int, generation: int
) -> None:
    """Move the checkpoint over events the projection ignores (no document changes)."""
    async with store.transaction() as uow:
        _stage_checkpoint(uow, projection, after, position, generation)


def _stage_checkpoint(
    uow: UnitOfWork, projection: Projection, after: int, position: int, generation: int
) -> None:
    uow.set_checkpoint(projection.checkpoint, position, expected=after)
    uow.set_checkpoint(generation_name(projection.name), generation, expected=generation)


async def catch_up(
    store: EventStore, projection: Projection, page_size: int = 1000, until: int | None = None
) -> int:
    """Project every event past the checkpoint (up to position `until`, when given), now,
    in this task; returns the checkpoint. (Tests, tools that need the read model current
    without running a runner, and a command answering with the read model it changed.)"""
    while True:
        generation = await live_generation(store, projection.name, 0.05)
        after = await store.get_checkpoint(projection.checkpoint)
        if until is not None and after >= until:
            return after
        limit = page_size if until is None else min(page_size, until - after)
        page = await store.read_all(after=after, limit=limit)
        if until is not None:
            page = [e for e in page if e.global_position <= until]
            if not page:
                # A position before `until` is still being committed by another writer
                # (the log is read gap-safe): wait for it rather than answer without it.
                await store.wait_for_events(after, 0.05)
                continue
        if not page:
            return after
        try:
            await apply_batch(store, projection, page, after, generation)
        except ConcurrencyError:
            continue  # a runner moved it meanwhile: go on from where it is
