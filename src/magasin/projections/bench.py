"""Rebuild throughput of a realistic projection, for bench/replay.py (not used at runtime).

Generates the transaction service's log for a run of sagas (created, paid, reserved,
fulfilled, completed; one in ten compensated and cancelled), interleaved as concurrent
sales write it, then times a full rebuild of `transaction.transactions` (shadow fill and
swap) over it. The caller hands in that projection (bench/replay.py passes
`magasin.transactions.projection.projection()`), so `projections` imports no context.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from magasin.eventstore.store import Append, EventStore
from magasin.projections.projection import Projection
from magasin.projections.rebuild import rebuild
from magasin.shared.messages import NewEvent

EVENTS = 200_000
CHUNK = 2000
"""Sales written concurrently (their events interleave in the log)."""


def _steps(i: int, tid: str) -> list[tuple[str, dict[str, Any]]]:
    created = {
        "transaction_id": tid, "store_id": f"store-{i % 3}", "customer_id": f"c-{i % 997}",
        "lines": [{"product_id": f"p-{i % 40}", "quantity": 1 + i % 3, "unit_price": 1999},
                  {"product_id": f"p-{(i + 7) % 40}", "quantity": 1, "unit_price": 499}],
        "total": 1999 * (1 + i % 3) + 499, "currency": "CAD", "payment_method": "VISA",
        "callback_url": None,
    }
    paid = {"transaction_id": tid, "payment_id": f"pay-{i}", "amount": created["total"]}
    if i % 10 == 9:  # inventory unavailable: refund, then cancel
        return [
            ("TransactionCreated", created), ("PaymentRecorded", paid),
            ("CompensationStarted", {"transaction_id": tid, "reason": "inventory_unavailable",
                                     "needs_refund": True, "needs_release": False}),
            ("RefundRecorded", {"transaction_id": tid, "amount": created["total"]}),
            ("TransactionCancelled", {"transaction_id": tid, "store_id": created["store_id"],
                                      "customer_id": created["customer_id"],
                                      "reason": "inventory_unavailable"}),
        ]
    return [
        ("TransactionCreated", created), ("PaymentRecorded", paid),
        ("ReservationRecorded", {"transaction_id": tid, "reservation_id": f"r-{i}"}),
        ("FulfilmentRecorded", {"transaction_id": tid, "order_id": f"o-{i}"}),
        ("TransactionCompleted", {"transaction_id": tid, "store_id": created["store_id"],
                                  "customer_id": created["customer_id"],
                                  "total": created["total"], "currency": "CAD"}),
    ]


async def generate(
    store: EventStore,
    events: int = EVENTS,
    after_chunk: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Append about `events` saga events; returns how many. `after_chunk` runs after each
    chunk of sales (PostgreSQL: refresh the planner's statistics, see _postgres)."""
    written = 0
    sale = 0
    while written < events:
        sales = [(sale + n, uuid.uuid4().hex) for n in range(CHUNK)]
        sale += CHUNK
        plans = [_steps(i, tid) for i, tid in sales]
        for step in range(5):
            ops = [
                Append(f"transaction-{tid}",
                       (NewEvent(type=plan[step][0], payload=plan[step][1],
                                 correlation_id=tid),), step)
                for (_, tid), plan in zip(sales, plans, strict=True)
            ]
            for start in range(0, len(ops), 500):
                await store.commit(ops[start:start + 500])
            written += len(ops)
        if after_chunk is not None:
            await after_chunk()
    return written


async def _measure(
    store: EventStore, projection: Projection,
    after_chunk: Callable[[], Awaitable[None]] | None = None,
) -> float:
    await generate(store, after_chunk=after_chunk)
    started = time.perf_counter()
    report = await rebuild(store, projection)
    return report.events / (time.perf_counter() - started)


async def _sqlite(projection: Projection) -> float:
    from magasin.eventstore.sqlite import SqliteEventStore

    with tempfile.TemporaryDirectory() as tmp:
        # NORMAL: generating the log is setup, not what is measured (a rebuild commits a
        # few large transactions, where fsync hardly counts).
        async with SqliteEventStore(Path(tmp) / "bench.db", synchronous="NORMAL") as store:
            return await _measure(store, projection)


async def _postgres(projection: Projection) -> float:
    import asyncpg

    from magasin.eventstore.postgres import PostgresEventStore

    url = os.environ.get("MAGASIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    schema = f"bench_rebuild_{uuid.uuid4().hex[:8]}"
    stats = await asyncpg.connect(url, server_settings={"search_path": schema})

    async def analyze() -> None:
        # What autovacuum does on a server that runs it (this machine's test server does
        # not): without statistics the appends' plans scan the whole events table, and
        # generating the log slowed to minutes (reading it is what is measured).
        await stats.execute("ANALYZE events; ANALYZE streams")

    try:
        async with PostgresEventStore(url, schema=schema) as store:
            return await _measure(store, projection, analyze)
    finally:
        await stats.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def rebuild_throughput(kind: str, projection: Projection) -> float:
    """Events per second of one full rebuild of `projection` (the caller names it: this
    package knows no bounded context); `kind` is "sqlite" or "postgres"."""
    runs = {"sqlite": _sqlite, "postgres": _postgres}
    if kind not in runs:
        raise ValueError(f"kind must be one of {sorted(runs)}, not {kind!r}")
    return asyncio.run(runs[kind](projection))
