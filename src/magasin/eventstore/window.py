"""A window over the tail of the event log, shared by the readers that follow it."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Collection, Sequence

from magasin.eventstore.store import EventStore
from magasin.shared.messages import RecordedEvent

TRUST_EMPTY_S = 0.25
"""How long a read that found the end of the log answers for the readers that follow."""


class _Waiter:
    """A follower waiting for an event it handles (see LogWindow.wait)."""

    __slots__ = ("accept", "future")

    def __init__(self, accept: Callable[[RecordedEvent], bool] | None,
                 future: asyncio.Future[None]) -> None:
        self.accept = accept
        self.future = future

    def wake(self) -> bool:
        if self.future.done():
            return False
        self.future.set_result(None)
        return True


class LogWindow:
    """The tail of the log as last read, shared by every reader that follows the head (the
    in-process bus's subscriptions, a service's projections), so each event is read and
    decoded once rather than once per reader.

    It holds every event with a position in (`start`, last position held] — what read_all
    returned, which is gap-safe — so any read starting inside it can be answered from it.

    Its followers wait for the commits they care about (`wait`): the embedded process has
    some forty of them (every lane of every consumer, every projection), and waking each at
    every commit for the one or two that handle its events cost more than the handling.
    """

    def __init__(self, store: EventStore, size: int) -> None:
        self.store = store
        self.size = size
        self.start = 0
        self.events: list[RecordedEvent] = []
        self._lock = asyncio.Lock()
        self._nothing_after = (-1, 0.0)
        """(position, when): a read past it found nothing then."""
        self._waiting: dict[str, set[_Waiter]] = {}
        """By event type: the followers `wait` for this process's next commit of one."""
        self.woken = 0
        """Followers this process's commits woke in `wait` so far (counted: the budget)."""
        store.on_commit(self._committed)

    @property
    def end(self) -> int:
        return self.events[-1].global_position if self.events else self.start

    async def read(self, after: int, limit: int) -> list[RecordedEvent]:
        if not self.start <= after < self.end:
            if self._known_empty(after):
                return []
            async with self._lock:  # one subscription reads for all of them
                if not self.start <= after < self.end:
                    page = await self.store.read_all(after=after, limit=limit)
                    self._keep(after, page)
                    if not page:
                        self._nothing_after = (after, time.monotonic())
                    return page
        index = bisect.bisect_right(self.events, after, key=lambda e: e.global_position)
        return self.events[index:index + limit]

    async def wait(
        self, after: int, timeout: float, types: Collection[str] | None = None,
        accept: Callable[[RecordedEvent], bool] | None = None,
    ) -> None:
        """Return soon after an event past `after` may be readable, or after `timeout` s,
        like EventStore.wait_for_events, but for a follower that handles only some events:
        where the store's own commits are all that would wake it (SQLite), it is woken only
        by a commit of an event of one of `types` that `accept` (when given) takes. Others'
        commits are found at the timeout, as before; the events it skipped are read then."""
        head = self.store.known_head()
        if types is None or self.store.wakes_for_other_processes or head is None or head > after:
            await self.store.wait_for_events(after, timeout)
            return
        loop = asyncio.get_running_loop()
        waiter = _Waiter(accept, loop.create_future())
        kinds = set(types)
        for kind in kinds:
            self._waiting.setdefault(kind, set()).add(waiter)
        # The timeout wakes the waiter like a commit would: a timer, not asyncio.timeout
        # (whose task bookkeeping cost more than the rest of a wait, some fourteen a sale);
        # a cancel still reaches the await.
        timer = loop.call_later(timeout, waiter.wake)
        try:
            await waiter.future
        finally:
            timer.cancel()
            for kind in kinds:
                waiting = self._waiting.get(kind)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._waiting[kind]

    def wake_all(self) -> None:
        """Wake every follower waiting in `wait` (one that must see the head now)."""
        for waiting in self._waiting.values():
            for waiter in waiting:
                waiter.wake()

    def _wake(self, events: Sequence[RecordedEvent]) -> None:
        for event in events:
            waiting = self._waiting.get(event.type)
            if waiting:
                for waiter in waiting:
                    if (waiter.accept is None or waiter.accept(event)) and waiter.wake():
                        self.woken += 1

    def _known_empty(self, after: int) -> bool:
        """Nothing past `after`, known without a query: this process committed nothing
        since a read found nothing there a moment ago (another process's commits are
        seen by the next read, TRUST_EMPTY_S later at most)."""
        head = self.store.known_head()
        position, when = self._nothing_after
        return (head is not None and head <= after == position
                and time.monotonic() - when < TRUST_EMPTY_S)

    def _committed(self, events: Sequence[RecordedEvent]) -> None:
        """Events this process just committed (EventStore.on_commit): taken without a query
        when they follow the window's end with no hole between (what the window holds is
        gap-safe, so nothing can still commit below them), and only once the window has
        been read (before, where the readers start is not known). A read that found the
        end a moment ago still vouches for what other processes did since (the same
        TRUST_EMPTY_S), so the readers following the head need no query either."""
        if self._waiting:
            self._wake(events)
        if not events or (not self.events and self.start == 0):
            return
        position = self.end
        for event in events:  # a run with no hole, right after the window's end
            position += 1
            if event.global_position != position:
                return
        end = self.end
        self._keep(end, list(events))
        position, when = self._nothing_after
        if position == end:
            self._nothing_after = (self.end, when)

    def _keep(self, after: int, page: list[RecordedEvent]) -> None:
        if not page:
            return
        if after == self.end:
            self.events.extend(page)
        else:
            self.start, self.events = after, list(page)
        if len(self.events) > self.size:
            drop = len(self.events) - self.size
            self.start = self.events[drop - 1].global_position
            del self.events[:drop]
        head = self.store.known_head()
        if head is not None and head <= self.end:
            # The page reached every commit known here: the readers that follow it need
            # not ask for more until a later one is (see _known_empty).
            self._nothing_after = (self.end, time.monotonic())
