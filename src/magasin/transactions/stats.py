"""Rolling saga statistics over the last minutes: how sagas ended (by outcome and reason),
sagas per second, p50/p95 duration, per time bucket and in flight by step.

Read from the records the transaction service keeps of each finished saga, written with
the sale's last step (keyed by the moment it ended, so a window is one key range), and from
its in-flight documents: the same
answer from any process of the transaction service, before and after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

from magasin.eventstore.store import EventStore
from magasin.observability import sagas as saga_metrics
from magasin.shared.clock import to_micros, utcnow

log = logging.getLogger("magasin.transactions.stats")

RETENTION_S = 3600
"""How long the record of a finished saga is kept: the longest window one can ask for."""
PAGE = 1000


def percentile(sorted_values: list[float], share: float) -> float | None:
    """Nearest-rank percentile of values sorted ascending (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def ended_between(
    store: EventStore, start: datetime, end: datetime, store_id: str | None = None
) -> list[dict[str, Any]]:
    """Records of the sagas that ended in [start, end), oldest first."""
    found: list[dict[str, Any]] = []
    after = f"{to_micros(start):020d}"  # sorts before every key of that microsecond
    stop = f"{to_micros(end):020d}"
    where: dict[str, str | int | bool] | None = {"store_id": store_id} if store_id else None
    while True:
        rows = await store.find_documents(saga_metrics.ENDS, where=where, after_key=after,
                                          limit=PAGE)
        for key, doc in rows:
            if key >= stop:
                return found
            found.append(doc)
        if len(rows) < PAGE:
            return found
        after = rows[-1][0]


async def rolling(
    store: EventStore, window_s: int, bucket_s: int, store_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Statistics of the sagas that ended in the last `window_s` seconds, and per bucket of
    `bucket_s` seconds (oldest bucket first; the last one ends now)."""
    now = now or utcnow()
    start = now - timedelta(seconds=window_s)
    records = await ended_between(store, start, now, store_id)
    count = math.ceil(window_s / bucket_s)
    first = now - timedelta(seconds=count * bucket_s)
    per_bucket: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for record in records:
        offset = (datetime.fromisoformat(record["ended_at"]) - first).total_seconds()
        per_bucket[min(count - 1, max(0, int(offset // bucket_s)))].append(record)
    by_status = Counter(r["status"] for r in records)
    reasons = Counter(r["reason"] for r in records if r["status"] == "CANCELLED")
    durations = sorted(float(r["duration_s"]) for r in records)
    buckets = []
    for index, bucket in enumerate(per_bucket):
        spent = sorted(float(r["duration_s"]) for r in bucket)
        statuses = Counter(r["status"] for r in bucket)
        buckets.append({
            "start": (first + timedelta(seconds=index * bucket_s)).isoformat(),
            "completed": statuses["COMPLETED"], "cancelled": statuses["CANCELLED"],
            "per_s": round(len(bucket) / bucket_s, 3),
            "p50_ms": _ms(percentile(spent, 0.5)), "p95_ms": _ms(percentile(spent, 0.95)),
        })
    in_flight = await saga_metrics.active_by_step(store) if store_id is None else None
    return {
        "now": now.isoformat(), "window_s": window_s, "bucket_s": bucket_s,
        "store_id": store_id,
        "finished": len(records),
        "completed": by_status["COMPLETED"], "cancelled": by_status["CANCELLED"],
        "cancelled_by_reason": dict(reasons.most_common()),
        "per_s": round(len(records) / window_s, 3),
        "p50_ms": _ms(percentile(durations, 0.5)), "p95_ms": _ms(percentile(durations, 0.95)),
        "in_flight": None if in_flight is None else {
            step: in_flight.get(step, 0) for step in saga_metrics.STEPS
        },
        "buckets": buckets,
    }


async def prune(store: EventStore, before: datetime) -> int:
    """Delete the records of sagas that ended before `before`; returns how many."""
    stop = f"{to_micros(before):020d}"
    removed = 0
    while True:
        rows = await store.find_documents(saga_metrics.ENDS, limit=PAGE)
        old = [key for key, _ in rows if key < stop]
        if not old:
            return removed
        async with store.transaction() as uow:
            for key in old:
                uow.delete_document(saga_metrics.ENDS, key)
        removed += len(old)
        if len(old) < len(rows):
            return removed


def prune_loop(
    store: EventStore, every_s: float = 60.0, keep_s: float = RETENTION_S,
    clock: Callable[[], datetime] = utcnow,
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background loop (for `Service.loops`) forgetting records older than `keep_s`."""

    async def loop() -> None:
        while True:
            try:
                await prune(store, clock() - timedelta(seconds=keep_s))
            except Exception:
                # The next sweep may find the database back.
                log.exception("pruning the finished sagas' records failed")
            await asyncio.sleep(every_s)

    return loop
