"""Wakes the clients following a sale (SSE) when its read model changes in this process."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StatusFeed:
    """The transaction service's projection and its API live in one process, in both modes,
    so a committed change can wake exactly the streams that follow that sale."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def changed(self, transaction_id: str) -> None:
        for waiter in self._waiters.get(transaction_id, ()):
            waiter.set()

    @contextmanager
    def follow(self, transaction_id: str) -> Iterator[asyncio.Event]:
        """An event set at each change of the sale. Register before reading the sale, so a
        change committed between the read and the wait is not missed."""
        waiter = asyncio.Event()
        self._waiters[transaction_id].add(waiter)
        try:
            yield waiter
        finally:
            self._waiters[transaction_id].discard(waiter)
            if not self._waiters[transaction_id]:
                del self._waiters[transaction_id]
