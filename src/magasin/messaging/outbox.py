"""The outbox relay: publishes the events a store appended to a bus, at least once each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from magasin.eventstore.store import EventStore, LogReader
from magasin.messaging.bus import EventBus
from magasin.observability import metrics
from magasin.shared.errors import Unavailable

log = logging.getLogger("magasin.messaging.outbox")


class OutboxRelay:
    """Claims a batch of the events the outbox holds, publishes it, and only then marks it
    sent.
    It looks again when the store signals a commit (or after `poll_interval`), not after
    every batch: a batch shorter than `batch_size` left nothing behind.

    Published events wait in the outbox's second stage: `ship_delay` seconds after a
    publish, a second loop ships all of them, as one message per `batch_size`, to the
    consumers of the whole log (an archive, an audit), which so take one delivery and one
    commit per batch rather than one per event. It also ships what waits there at start,
    every `sweep_interval` (what another process of the service left, dying) and at stop.

    With `publishes`, only the events of those types go to the bus's consumers: the others
    (what a context records for its own aggregates, which no other context handles) are
    marked sent unpublished, and reach the whole log's consumers in the shipped batches
    like every event. None publishes every event.

    A crash between the publish (or the shipping) and the mark leaves the events pending, so
    they are published again: consumers see a duplicate (their inbox absorbs it), never a
    gap. While the bus is unreachable the events stay pending and the relay retries with
    capped exponential backoff.
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
        ship_delay: float = 0.2,
        sweep_interval: float = 30.0,
        publishes: Collection[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.store = store
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.ship_delay = ship_delay
        self.sweep_interval = sweep_interval
        self.publishes = None if publishes is None else frozenset(publishes)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._published = asyncio.Event()
        """Set by a publish: there is something to ship."""
        self.read: LogReader | None = None
        """How the store's outbox reads the log, when it is a position in it: the runtime
        gives the window of the log the process's projections share (eventstore.window),
        which holds what the process just committed: a publish then reads nothing."""

    async def start(self) -> None:
        if not self._tasks:
            self._stopping.clear()
            self._tasks = [asyncio.create_task(self._run(self._step), name="outbox-relay"),
                           asyncio.create_task(self._run(self._ship_step), name="outbox-ship")]

    async def stop(self, grace: float = 5.0) -> None:
        """Let the batch in flight finish for up to `grace` seconds, then cancel it, and
        ship what was published (within what is left of `grace`); a batch cut short stays
        pending and is published (or shipped) again later."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        self._stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await self.drain_log()
        except Exception as exc:  # TimeoutError, Unavailable...: the next start ships them
            log.warning("outbox relay could not ship what it published before stopping: %r",
                        exc)

    async def relay_once(self) -> int:
        """Publish one batch of pending events (those of `publishes`; the others are only
        marked); returns how many it took (0: the outbox was empty)."""
        async with self.store.outbox_batch(self.batch_size, read=self.read) as events:
            sent = (events if self.publishes is None
                    else [e for e in events if e.type in self.publishes])
            if sent:
                started = time.perf_counter()
                kinds = [(e.type, e.metadata) for e in sent]
                try:
                    await self.bus.publish(sent)
                except Exception:
                    metrics.published(kinds, "failed")
                    raise
                metrics.published(kinds, "ok", time.perf_counter() - started)
        if events:
            self._published.set()
        return len(events)

    async def ship_once(self) -> int:
        """Ship one batch of published events to the whole log's consumers; returns how
        many (0: none waited)."""
        async with self.store.outbox_batch(self.batch_size, log=True, read=self.read) as events:
            if events:
                await self.bus.ship(events)
        return len(events)

    async def drain_log(self) -> int:
        """Ship until nothing published waits; returns how many events were shipped."""
        total = 0
        while shipped := await self.ship_once():
            total += shipped
        return total

    async def drain(self) -> int:
        """Publish until the outbox is empty; returns how many events it took."""
        total = 0
        while published := await self.relay_once():
            total += published
        return total

    async def _run(self, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        backoff = self.initial_backoff
        while not self._stopping.is_set():
            try:
                await step()
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
            # A short batch took every event there was to claim: nothing to do until the
            # next commit (or, in another process, another relay publishes).
            await self._unless_stopped(_signalled(signal, self.poll_interval))

    async def _ship_step(self) -> None:
        # Cleared before shipping: a publish from now on is shipped at the next step.
        self._published.clear()
        while await self.ship_once() >= self.batch_size:
            pass
        await self._unless_stopped(_signalled(self._published, self.sweep_interval))
        if self._published.is_set() and self.ship_delay > 0:
            # Let what the next publishes bring join this batch, until the next multiple of
            # the delay on the clock: the relays of every service ship at the same moments,
            # so a consumer of the whole log takes all their batches in one commit.
            wait = self.ship_delay - time.time() % self.ship_delay
            await self._unless_stopped(asyncio.sleep(wait))

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
