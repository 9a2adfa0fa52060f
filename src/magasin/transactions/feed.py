"""Wakes the clients following a sale (SSE) when its read model changes in this process, and
hands every change to the clients watching all sales (the live feed)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

LIVE_BUFFER = 2000
"""Changes a live client may fall behind by before it is told to reload."""
RELOAD: Mapping[str, Any] = {}
"""Put in a watcher's queue (this very object) in place of the changes it dropped."""
LAST_KEPT = 2048
"""Sales whose last change this process remembers (`StatusFeed.last`): enough for the sales
whose streams start right after their creation, the common case."""


class Watcher:
    """One client of the live feed: the changed sale documents waiting to be sent."""

    def __init__(self, buffer: int = LIVE_BUFFER) -> None:
        self.queue: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue(buffer)

    def offer(self, doc: Mapping[str, Any]) -> None:
        try:
            self.queue.put_nowait(doc)
        except asyncio.QueueFull:
            # A slow client must not hold memory for every sale: it drops what waits and
            # is told to reload instead (the list endpoint is the source of truth).
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(RELOAD)


class Follower:
    """One client following a sale: set at each change, with the sale's document as this
    process committed it when the change was its own (None: read it from the store)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.doc: Mapping[str, Any] | None = None

    def changed(self, doc: Mapping[str, Any] | None) -> None:
        self.doc = doc
        self.event.set()

    def take(self) -> Mapping[str, Any] | None:
        """The document handed with the last change (once), and ready for the next."""
        doc, self.doc = self.doc, None
        self.event.clear()
        return doc


class StatusFeed:
    """The transaction service's projection and its API live in one process, in both modes,
    so a committed change can wake exactly the streams that follow that sale, and be handed
    to the streams that watch every sale. With several processes of the transaction service
    the runners compete for each batch: the one that loses is told what the other committed
    (`Projection.elsewhere`) and wakes its own clients too."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[Follower]] = defaultdict(set)
        self._watchers: set[Watcher] = set()
        self._last: OrderedDict[str, Mapping[str, Any] | int] = OrderedDict()
        """By sale, the document of its last change this process was told of, or the
        version that change reached when it came without its document."""

    def changed(
        self, transaction_id: str, doc: Mapping[str, Any] | None = None, version: int = 0
    ) -> None:
        """The sale changed: `doc` is its document as committed, when this process has it
        (the followers then need not read it again); otherwise `version`, the sale's version
        after the change, when known (0: unknown)."""
        self._remember(transaction_id, doc, version)
        for waiter in self._waiters.get(transaction_id, ()):
            waiter.changed(doc)
        if doc is not None:
            for watcher in self._watchers:
                watcher.offer(doc)

    def _remember(self, tid: str, doc: Mapping[str, Any] | None, version: int) -> None:
        known = self._last.get(tid, 0)
        reached = known if isinstance(known, int) else int(known["version"])
        if doc is not None and doc["version"] > reached:
            self._last[tid] = doc
        elif doc is None:
            # Whatever document was kept is no longer known to be the last: keep the highest
            # version heard of, so that an older document told later is not taken for it
            # (this process's own change, told after another process's later one).
            self._last[tid] = max(reached, version)
        self._last.move_to_end(tid)
        if len(self._last) > LAST_KEPT:
            self._last.popitem(last=False)

    def last(self, transaction_id: str) -> Mapping[str, Any] | None:
        """The sale's document as of the last change this process was told of, when that
        change came with it; None: read it. A change another process commits is told
        without its document, so a document returned here may be one change behind
        another process's commit that this process has not been told of yet; that change
        reaches the followers when it is told (register with `follow` first)."""
        doc = self._last.get(transaction_id)
        return None if doc is None or isinstance(doc, int) else doc

    def followed(self, transaction_id: str) -> bool:
        """Whether a client follows this sale in this process."""
        return transaction_id in self._waiters

    @property
    def watched(self) -> bool:
        """Whether any live client is connected (else the projection hands it nothing)."""
        return bool(self._watchers)

    @contextmanager
    def follow(self, transaction_id: str) -> Iterator[Follower]:
        """Told of each change of the sale. Register before reading the sale, so a change
        committed between the read and the wait is not missed."""
        waiter = Follower()
        self._waiters[transaction_id].add(waiter)
        try:
            yield waiter
        finally:
            self._waiters[transaction_id].discard(waiter)
            if not self._waiters[transaction_id]:
                del self._waiters[transaction_id]

    @contextmanager
    def watch(self, buffer: int = LIVE_BUFFER) -> Iterator[Watcher]:
        """Every sale document committed from now on, in commit order, until the block ends."""
        watcher = Watcher(buffer)
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)
