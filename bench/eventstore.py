"""Event store throughput, ours against the bare driver, SQLite and PostgreSQL, in one run.

Prints one JSON object: {"sqlite": {...}, "postgres": {...}} with events/s for
append_1_writer, append_8_writers, append_batch10, read_all (our store) and
raw_append_1_writer, raw_append_8_writers, raw_read_all (the bare driver doing equivalent
inserts, and selecting the same rows in the same pages), plus the ratios ours/raw. Appends
are the medians of ROUNDS rounds, each timing ours then the bare driver (seconds/ROUNDS each).
read_all and raw_read_all are each the median of READ_PASSES passes over the whole log
(100,000 events or more, pages of 5000), taken in turns. PostgreSQL is the server of
MAGASIN_DATABASE_URL (default: local); the benchmark works in a schema of its own that it
drops afterwards.

    python bench/eventstore.py [--seconds 2.0] [--only sqlite|postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import EventStore
from magasin.shared.messages import NewEvent

PAYLOAD = {"transaction_id": "3f1c0a52-1e0b-4c1e-9a53-0f1b1d6a9a11", "amount": 12999,
           "currency": "CAD", "lines": [{"product_id": "p-42", "quantity": 2}]}
META = {"service": "bench"}
READ_EVENTS = 100_000
READ_PAGE = 5000
READ_PASSES = 3
ROUNDS = 3


def event() -> NewEvent:
    return NewEvent(type="PaymentProcessed", payload=PAYLOAD, metadata=META,
                    correlation_id="bench")


async def timed(seconds: float, writers: int, step: Callable[[int, int], Awaitable[int]]) -> float:
    """Run `step(writer, i)` in `writers` concurrent loops for `seconds`; events per second."""
    deadline = time.perf_counter() + seconds
    counts = [0] * writers

    async def loop(w: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            counts[w] += await step(w, i)
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(writers)))
    return sum(counts) / (time.perf_counter() - started)


Step = Callable[[int, int], Awaitable[int]]


def our_steps(store: EventStore) -> dict[str, tuple[int, Step]]:
    """Each append measurement of our store: (writers, one step of a writer)."""
    run = uuid.uuid4().hex[:6]

    def single(name: str) -> Step:
        async def step(w: int, i: int) -> int:
            await store.append(f"{name}-{run}-{w}-{i // 50}", [event()])
            return 1
        return step

    async def batch(w: int, i: int) -> int:
        await store.append(f"bench10-{run}-{w}-{i}", [event() for _ in range(10)])
        return 10

    return {"append_1_writer": (1, single("bench1")), "append_8_writers": (8, single("bench8")),
            "append_batch10": (1, batch)}


async def appends(store: EventStore, seconds: float,
                  raw: Callable[[int, float], Awaitable[float]]) -> dict[str, float]:
    """Medians of ROUNDS rounds, each measuring ours then the bare driver for seconds/ROUNDS:
    alternating exposes both to the same load and fsync weather (one long run of each in
    turn did not: the disk's latency drifts over tens of seconds)."""
    runs: dict[str, list[float]] = {}
    share = seconds / ROUNDS
    for _ in range(ROUNDS):
        for name, (writers, step) in our_steps(store).items():
            runs.setdefault(name, []).append(await timed(share, writers, step))
            if name != "append_batch10":
                runs.setdefault(f"raw_{name}", []).append(await raw(writers, share))
    return {name: statistics.median(values) for name, values in runs.items()}


async def filled(store: EventStore) -> None:
    """Append until the log is big enough to time read_all over."""
    run = uuid.uuid4().hex[:6]
    total = await store.last_position()
    while total < READ_EVENTS:
        await asyncio.gather(*(
            store.append(f"fill-{run}-{total}-{k}", [event() for _ in range(100)])
            for k in range(10)
        ))
        total = await store.last_position()


async def read_all(store: EventStore) -> float:
    """Events per second of one pass over the whole log through the port."""
    started, after, n = time.perf_counter(), 0, 0
    while page := await store.read_all(after=after, limit=READ_PAGE):
        n += len(page)
        after = page[-1].global_position
    return n / (time.perf_counter() - started)


async def read_passes(ours_: Callable[[], Awaitable[float]],
                      raw: Callable[[], Awaitable[float]]) -> dict[str, float]:
    """Medians of READ_PASSES passes of ours and of the bare driver, in turns (the machine's
    load changes: alternating exposes both to the same)."""
    mine, bare = [], []
    for _ in range(READ_PASSES):
        mine.append(await ours_())
        bare.append(await raw())
    return {"read_all": statistics.median(mine), "raw_read_all": statistics.median(bare)}


# -- the bare drivers doing the same inserts -----------------------------------------------

RAW_TABLE = """CREATE TABLE raw_events (
    global_position INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, stream_id TEXT NOT NULL,
    stream_version INTEGER NOT NULL, type TEXT NOT NULL, schema_version INTEGER NOT NULL,
    occurred_at INTEGER NOT NULL, correlation_id TEXT, metadata TEXT NOT NULL,
    payload TEXT NOT NULL, UNIQUE (stream_id, stream_version))"""
RAW_INSERT = ("INSERT INTO raw_events (event_id, stream_id, stream_version, type, schema_version,"
              " occurred_at, correlation_id, metadata, payload) VALUES (?,?,?,?,?,?,?,?,?)")


def raw_sqlite(path: Path, seconds: float, writers: int) -> float:
    """sqlite3 with the same pragmas: one INSERT + COMMIT per event, `writers` threads."""
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute(f"CREATE TABLE IF NOT EXISTS {RAW_TABLE.split('CREATE TABLE ')[1]}")
    setup.close()
    counts = [0] * writers
    deadline = time.perf_counter() + seconds
    tag = uuid.uuid4().hex[:6]

    def loop(w: int) -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous = FULL")
        while time.perf_counter() < deadline:
            i = counts[w]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(RAW_INSERT, (
                str(uuid.uuid4()), f"raw-{tag}-{w}", i + 1, "PaymentProcessed", 1,
                time.time_ns() // 1000, "bench",
                orjson.dumps(META).decode(), orjson.dumps(PAYLOAD).decode(),
            ))
            conn.execute("COMMIT")
            counts[w] += 1
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


async def raw_postgres(dsn: str, schema: str, seconds: float, writers: int) -> float:
    """asyncpg, one INSERT per transaction per connection, `writers` connections."""
    pool = await asyncpg.create_pool(dsn, min_size=writers, max_size=writers,
                                     server_settings={"search_path": schema})
    ddl = RAW_TABLE.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
    ddl = ddl.replace("metadata TEXT", "metadata JSONB").replace("payload TEXT", "payload JSONB")
    ddl = ddl.replace("occurred_at INTEGER", "occurred_at BIGINT")
    await pool.execute(ddl.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    insert = RAW_INSERT
    for n in range(9, 0, -1):
        insert = insert.replace("?", f"${10 - n}", 1)
    tag = uuid.uuid4().hex[:6]
    meta, payload = orjson.dumps(META).decode(), orjson.dumps(PAYLOAD).decode()

    async def step(w: int, i: int) -> int:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(insert, str(uuid.uuid4()), f"raw-{tag}-{w}", i + 1,
                               "PaymentProcessed", 1, time.time_ns() // 1000, "bench",
                               meta, payload)
        return 1

    try:
        return await timed(seconds, writers, step)
    finally:
        await pool.close()


RAW_SELECT = ("SELECT event_id, type, schema_version, stream_id, stream_version, "
              "global_position, occurred_at, correlation_id, causation_id, traceparent, "
              "metadata, payload FROM events WHERE global_position > ? "
              "ORDER BY global_position LIMIT ?")


def raw_sqlite_read(path: Path) -> float:
    """sqlite3 selecting the rows our read_all selects, in the same pages: the driver's
    ceiling for reading the log."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        started, after, n = time.perf_counter(), 0, 0
        while rows := conn.execute(RAW_SELECT, (after, READ_PAGE)).fetchall():
            n += len(rows)
            after = rows[-1][5]
        return n / (time.perf_counter() - started)
    finally:
        conn.close()


async def raw_postgres_read(dsn: str, schema: str) -> float:
    """asyncpg selecting the rows our read_all selects (JSON as text), in the same pages."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    sql = RAW_SELECT.replace("metadata, payload", "metadata::text, payload::text")
    sql = sql.replace("?", "$1", 1).replace("?", "$2", 1)
    try:
        started, after, n = time.perf_counter(), 0, 0
        while rows := await conn.fetch(sql, after, READ_PAGE):
            n += len(rows)
            after = rows[-1][5]
        return n / (time.perf_counter() - started)
    finally:
        await conn.close()


def with_ratios(result: dict[str, float]) -> dict[str, float]:
    result = {k: round(v) for k, v in result.items()}
    for n in ("append_1_writer", "append_8_writers", "read_all"):
        raw = result.get(f"raw_{n}")
        if raw:
            result[f"ratio_{n}"] = round(result[n] / raw, 3)
    return result


async def bench_sqlite(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path, raw_path = Path(tmp) / "bench.db", Path(tmp) / "raw.db"
        async with SqliteEventStore(path) as store:

            async def raw_append(writers: int, share: float) -> float:
                return raw_sqlite(raw_path, share, writers)

            async def raw_read() -> float:
                return raw_sqlite_read(path)

            result = await appends(store, seconds, raw_append)
            await filled(store)
            result |= await read_passes(lambda: read_all(store), raw_read)
    return with_ratios(result)


async def bench_postgres(seconds: float) -> dict[str, float]:
    dsn = os.environ.get("MAGASIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    from magasin.eventstore.postgres import PostgresEventStore

    try:
        async with PostgresEventStore(dsn, schema=schema, pool_max=10) as store:

            async def raw_append(writers: int, share: float) -> float:
                return await raw_postgres(dsn, schema, share, writers)

            result = await appends(store, seconds, raw_append)
            await filled(store)
            result |= await read_passes(lambda: read_all(store),
                                        lambda: raw_postgres_read(dsn, schema))
    finally:
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return with_ratios(result)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.only in (None, "sqlite"):
        out["sqlite"] = await bench_sqlite(args.seconds)
    if args.only in (None, "postgres"):
        out["postgres"] = await bench_postgres(args.seconds)
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
