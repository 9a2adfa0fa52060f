"""The floors a saga is measured against, and the ratios of issue 11's targets, for
bench/saga.py (which measures the HTTP and broker floors itself; this adds PostgreSQL's).

- `raw_pg_commits_per_s`: asyncpg alone, `connections` connections each committing one
  single-row INSERT per statement (autocommit), on a table of its own: what a unit of work
  costs PostgreSQL at the least.
- `ratios(out)`: from bench/saga.py's result, for each measured deployment (and each saga
  coordination, when it measured several):
  embedded `ratio_vs_raw_http` = sagas/s over `raw_http_sagas_per_s` (target ≥ 0.35);
  distributed `broker_roundtrips_per_saga` and `pg_commits_per_saga` = how many bare
  round trips (publish+confirm+consume+ack) or bare commits take the time one saga takes,
  next to the budgets of deliveries and units of work per sale (tests/budget/budgets.py),
  and `ratio_vs_broker_ceiling` / `ratio_vs_pg_ceiling` = sagas/s over the rate the bare
  floor would allow a sale that stayed within those budgets;
  `work_floor_sagas_per_s` = the rate the three bare floors together would allow for the
  work this run counted per saga (`messages_per_saga` or `broker_deliveries_per_saga`,
  whichever is more, as bare broker round trips; `commits_per_saga` as bare commits; one
  bare HTTP sale), their times added since they share the machine's cores, and
  `ratio_vs_work_floor` = sagas/s over it: how near the code is to what its drivers alone
  would cost for the operations it does (the gap a redesign of those operations, not of
  their count, could close).

    python bench/floors.py [--seconds 5]      # the PostgreSQL floor alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.budget.budgets import DISTRIBUTED

PG_URL = os.environ.get("MAGASIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DELIVERIES = DISTRIBUTED["broker deliveries"]
UNITS = DISTRIBUTED["units of work"]
EMBEDDED_TARGET = 0.35


async def raw_pg_commits_per_s(seconds: float, connections: int = 8, dsn: str = PG_URL) -> float:
    """Single-row commits per second, `connections` at once, in a schema dropped afterwards."""
    schema = f"bench_floor_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        await admin.execute(f'CREATE TABLE "{schema}".t '
                            "(id bigserial PRIMARY KEY, body jsonb NOT NULL)")
        pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
        try:
            body = json.dumps({"event": "x" * 300})
            sql = f'INSERT INTO "{schema}".t (body) VALUES ($1::jsonb)'
            deadline = time.perf_counter() + seconds
            done = 0

            async def writer() -> None:
                nonlocal done
                async with pool.acquire() as conn:
                    while time.perf_counter() < deadline:
                        await conn.execute(sql, body)
                        done += 1

            started = time.perf_counter()
            await asyncio.gather(*(writer() for _ in range(connections)))
            return done / (time.perf_counter() - started)
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def _runs(result: Any) -> Iterator[dict[str, Any]]:
    """The measured runs of one deployment: itself, or one per saga coordination."""
    if not isinstance(result, dict):
        return
    if "sagas_per_s" in result:
        yield result
    else:
        for run in result.values():
            yield from _runs(run)


def ratios(out: dict[str, Any]) -> None:
    """Add the ratios next to each run's figures in bench/saga.py's `out`, in place."""
    http = out.get("raw_http_sagas_per_s")
    broker = out.get("raw_broker_roundtrip_per_s")
    pg = out.get("raw_pg_commits_per_s")
    for run in _runs(out.get("embedded")):
        if http:
            run["ratio_vs_raw_http"] = round(run["sagas_per_s"] / http, 3)
            run["target_ratio_vs_raw_http"] = EMBEDDED_TARGET
    for run in _runs(out.get("distributed")):
        rate = run["sagas_per_s"]
        if broker and rate:
            run["broker_roundtrips_per_saga"] = round(broker / rate, 1)
            run["ratio_vs_broker_ceiling"] = round(rate / (broker / DELIVERIES), 3)
        if pg and rate:
            run["pg_commits_per_saga"] = round(pg / rate, 1)
            run["ratio_vs_pg_ceiling"] = round(rate / (pg / UNITS), 3)
        run["budget_deliveries_per_saga"] = DELIVERIES
        run["budget_units_of_work_per_saga"] = UNITS
        floor = work_floor(run, http=http, broker=broker, pg=pg)
        if floor and rate:
            run["work_floor_sagas_per_s"] = round(floor, 1)
            run["ratio_vs_work_floor"] = round(rate / floor, 3)


def work_floor(run: dict[str, Any], *, http: float | None, broker: float | None,
               pg: float | None) -> float | None:
    """Sagas/s the bare floors allow for the operations `run` counted per saga."""
    if not (http and broker and pg):
        return None
    roundtrips = max(run.get("messages_per_saga", 0.0), run.get("broker_deliveries_per_saga", 0.0))
    seconds = roundtrips / broker + run.get("commits_per_saga", 0.0) / pg + 1 / http
    return 1 / seconds


async def add_floors_and_ratios(out: dict[str, Any], seconds: float) -> None:
    """bench/saga.py's last step: the PostgreSQL floor, then every ratio."""
    out["raw_pg_commits_per_s"] = round(await raw_pg_commits_per_s(seconds))
    ratios(out)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    rate = await raw_pg_commits_per_s(args.seconds, args.connections)
    print(json.dumps({"raw_pg_commits_per_s": round(rate)}))


if __name__ == "__main__":
    asyncio.run(main())
