"""The outbox relay: publishes the events a store appended to a bus, at least once each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from magasin.eventstore.store import EventStore
from magasin.messaging.bus import EventBus
from magasin.observability import metrics
from magasin.shared.errors import Unavailable

log = logging.getLogger("magasin.messaging.outbox")


class OutboxRelay:
    """Claims a batch of pending outbox rows, publishes it, and only then marks it sent.
    It looks again when the store signals a commit (or after `poll_interval`), not after
    every batch: a batch shorter than `batch_size` left nothing behind.

    A crash between the publish and the mark leaves the rows pending, so they are published
    again: consumers see a duplicate (their inbox absorbs it), never a gap. While the bus is
    unreachable the rows stay pending and the relay retries with capped exponential backoff.
    """

    def __init__(
        self,
        store: EventStore,
        bus: EventBus,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        initial_backoff: float = 0.1,
        max_backoff: float = 30.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.store = store
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self, grace: float = 5.0) -> None:
        """Let the batch in flight finish for up to `grace` seconds, then cancel it; a batch
        cut short stays pending and is published again later."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def relay_once(self) -> int:
        """Publish one batch of pending events; returns how many (0: the outbox was empty)."""
        async with self.store.outbox_batch(self.batch_size) as events:
            if events:
                started = time.perf_counter()
                kinds = [(e.type, e.metadata) for e in events]
                try:
                    await self.bus.publish(events)
                except Exception:
                    metrics.published(kinds, "failed")
                    raise
                metrics.published(kinds, "ok", time.perf_counter() - started)
        return len(events)

    async def drain(self) -> int:
        """Publish until the outbox is empty; returns how many events were published."""
        total = 0
        while published := await self.relay_once():
            total += published
        return total

    async def _run(self) -> None:
        backoff = self.initial_backoff
        while not self._stopping.is_set():
            try:
                await self._step()
            except Unavailable as exc:
                log.warning("outbox relay cannot publish, retrying in %.2fs: %s", backoff, exc)
            except Exception:
                # The relay must outlive any one failure (a store hiccup, say).
                log.exception("outbox relay step failed, retrying in %.2fs", backoff)
            else:
                backoff = self.initial_backoff
                continue
            await self._unless_stopped(asyncio.sleep(backoff))
            backoff = min(backoff * 2, self.max_backoff)

    async def _step(self) -> None:
        # Taken before claiming: a commit after this moment wakes the wait below, one
        # before it is in the batch. No query: a store that cannot signal commits is read.
        signal = self.store.commit_signal()
        seen = await self.store.last_position() if signal is None else 0
        published = await self.relay_once()
        if signal is None:
            if not published:
                await self._unless_stopped(
                    self.store.wait_for_events(after=seen, timeout=self.poll_interval)
                )
        elif published < self.batch_size:
            # A short batch took every row there was to claim: nothing to do until the
            # next commit (rows other relays hold are theirs to publish).
            await self._unless_stopped(_signalled(signal, self.poll_interval))

    async def _unless_stopped(self, waiting: Coroutine[Any, Any, None]) -> None:
        """Await `waiting`, or give up on it as soon as `stop()` is called."""
        wait = asyncio.ensure_future(waiting)
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({wait, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wait.cancel()
            stopped.cancel()
            await asyncio.gather(wait, stopped, return_exceptions=True)
        if wait.done() and not wait.cancelled() and (exc := wait.exception()) is not None:
            raise exc


async def _signalled(signal: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await signal.wait()
