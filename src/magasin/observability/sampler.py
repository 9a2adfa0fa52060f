"""Samples the gauges that need a query (outbox backlog, pending dead letters, projection lag,
sagas in flight by step) every few seconds, since a scrape cannot await the store; the last
sample is also kept on the runtime for `/health` (`Runtime.last_sample`)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from magasin import projections
from magasin.observability import metrics, sagas
from magasin.shared.clock import utcnow

if TYPE_CHECKING:
    from magasin.bootstrap import Runtime

log = logging.getLogger("magasin.observability.sampler")


async def sample_forever(runtime: Runtime, interval: float) -> None:
    """Sample until cancelled; a failing sample is logged and tried again next time."""
    while True:
        await sample_once(runtime)
        await asyncio.sleep(interval)


async def sample_once(runtime: Runtime) -> None:
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("dead letters", lambda: _dead_letters(runtime)),
        ("projection lag", lambda: _projection_lag(runtime)),
        ("partitions", lambda: _partitions(runtime)),
    ]
    if runtime.store.outbox:
        steps.append(("outbox backlog", lambda: _outbox(runtime)))
    if any(s.name == sagas.SERVICE for s in runtime.services):
        steps.append(("active sagas", lambda: _active_sagas(runtime)))
        steps.append(("stuck sagas", lambda: _stuck_sagas(runtime)))
    for what, step in steps:
        try:
            await step()
        except Exception as exc:  # a store hiccup must not stop the sampling
            log.warning("could not sample %s: %r", what, exc)
    runtime.last_sample["sampled_at"] = utcnow().isoformat()


def _service_label(runtime: Runtime) -> str:
    names = [s.name for s in runtime.services]
    return names[0] if len(names) == 1 else runtime.mode


async def _outbox(runtime: Runtime) -> None:
    backlog = await runtime.store.outbox_backlog()
    unshipped = await runtime.store.outbox_backlog(log=True)
    metrics.OUTBOX_BACKLOG.labels(_service_label(runtime), "publish").set(backlog)
    metrics.OUTBOX_BACKLOG.labels(_service_label(runtime), "ship").set(unshipped)
    runtime.last_sample["outbox_backlog"] = backlog
    runtime.last_sample["outbox_unshipped"] = unshipped
    runtime.last_sample["outbox_relaying"] = runtime.store.relays_outbox


async def _partitions(runtime: Runtime) -> None:
    states = await runtime.bus.partition_states()
    metrics.PARTITION_OWNED.clear()  # an owner that left must not stay at 1
    for state in states:
        label = str(state.name)
        if state.depth is not None:
            metrics.PARTITION_DEPTH.labels(state.consumer, label).set(state.depth)
        if state.owner is not None and state.partition is not None:
            metrics.PARTITION_OWNED.labels(state.consumer, label, state.owner).set(1)
    runtime.last_sample["partitions"] = [
        {"consumer": s.consumer, "partition": s.name, "owner": s.owner, "depth": s.depth}
        for s in states
    ]


async def _dead_letters(runtime: Runtime) -> None:
    pending = Counter(letter.consumer for letter in await runtime.bus.dead_letters())
    consumers = {c for s in runtime.services for c in s.consumers} | set(pending)
    for consumer in consumers:
        metrics.DEAD_LETTER_BACKLOG.labels(consumer).set(pending.get(consumer, 0))
    runtime.last_sample["dead_letters_pending"] = {c: pending.get(c, 0) for c in sorted(consumers)}


async def _active_sagas(runtime: Runtime) -> None:
    sagas.sample_active(await sagas.active_by_step(runtime.store))


async def _stuck_sagas(runtime: Runtime) -> None:
    stuck = await sagas.stuck_by_state(runtime.store)
    sagas.sample_stuck(stuck)
    runtime.last_sample["sagas_stuck"] = dict(stuck)


async def _projection_lag(runtime: Runtime) -> None:
    found = await projections.lags(runtime.store)
    for lag in found:
        metrics.PROJECTION_LAG.labels(lag.name).set(lag.lag_events)
        metrics.PROJECTION_LAG_SECONDS.labels(lag.name).set(lag.lag_seconds)
    runtime.last_sample["projections"] = [lag.as_dict() for lag in found]
