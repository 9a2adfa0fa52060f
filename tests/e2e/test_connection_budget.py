"""The PostgreSQL connection budget with one service scaled out: four transaction processes
(and one of each other service of the saga) run sales while every process stays within
`MAGASIN_PG_POOL_MAX + 1` connections and the cluster within `processes × (pool + 1)`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from magasin.eventstore.connections import per_cluster, per_process
from tests.e2e.processes import SERVICES, Cluster, running_cluster
from tests.e2e.test_distributed import (
    API_KEY,
    GATEWAY_LIMITS,
    RETRY_ATTEMPTS,
    Magasin,
    assert_books_balance,
    random_sales,
    stock_up,
)

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]

POOL_MAX = 3
TRANSACTION_PROCESSES = 4
PROCESSES = len(SERVICES) - 1 + TRANSACTION_PROCESSES


@pytest.fixture(scope="module")
def scaled(
    pg_database: str, amqp_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(
        MAGASIN_API_KEYS=API_KEY, MAGASIN_BANK_LATENCY_MS="0",
        MAGASIN_RETRY_ATTEMPTS=str(RETRY_ATTEMPTS), MAGASIN_RETRY_INITIAL_DELAY="0.05",
        MAGASIN_PG_POOL_MAX=str(POOL_MAX), MAGASIN_PG_CLUSTER_PROCESSES=str(PROCESSES),
        PYTHONUNBUFFERED="1",
    )
    services = (*SERVICES, *["transaction"] * (TRANSACTION_PROCESSES - 1))
    with running_cluster(
        pg_database, amqp_url, tmp_path_factory.mktemp("budget"), kind="budget",
        services=services, env=env, retry_attempts=RETRY_ATTEMPTS, gateway=GATEWAY_LIMITS,
    ) as running:
        yield running


@pytest.fixture
async def magasin(scaled: Cluster) -> AsyncIterator[Magasin]:
    async with httpx.AsyncClient(headers={"X-API-Key": API_KEY}, timeout=30.0) as client:
        yield Magasin(scaled, client)


async def connections(conn: asyncpg.Connection, database: str) -> Counter[str]:
    """The cluster's connections now, by owner (`magasin:<schema>:<pid>`)."""
    rows = await conn.fetch(
        "SELECT application_name FROM pg_stat_activity "
        "WHERE datname = $1 AND application_name LIKE 'magasin:%'", database)
    return Counter(r[0] for r in rows)


async def test_four_processes_of_one_service_run_sales_within_the_connection_budget(
    magasin: Magasin, scaled: Cluster
) -> None:
    database = scaled.env["MAGASIN_DATABASE_URL"].rsplit("/", 1)[1]
    watcher = await asyncpg.connect(scaled.env["MAGASIN_DATABASE_URL"])
    peaks: Counter[str] = Counter()
    totals: list[int] = []
    selling = True

    async def watch() -> None:
        while selling:
            now = await connections(watcher, database)
            peaks.update({k: v - peaks[k] for k, v in now.items() if v > peaks[k]})
            totals.append(sum(now.values()))
            await asyncio.sleep(0.02)

    watching = asyncio.create_task(watch())
    try:
        store, stock, probe = await stock_up(magasin, "Budget", {"A": 40, "B": 30, "C": 20})
        posted = await asyncio.gather(*(
            magasin.sell(store, items, payment_method=method)
            for items, method in random_sales(list(stock), 80, seed=7)
        ))
        outcomes = await assert_books_balance(magasin, store, stock, [probe, *posted])
    finally:
        selling = False
        await watching
        await watcher.close()

    assert outcomes["COMPLETED"] > 0, outcomes
    transactions = [owner for owner in peaks if owner.startswith("magasin:magasin_transaction:")]
    assert len(transactions) == TRANSACTION_PROCESSES, sorted(peaks)
    over = {owner: n for owner, n in peaks.items() if n > per_process(POOL_MAX)}
    assert over == {}, f"processes over {per_process(POOL_MAX)} connections: {over}"
    assert max(totals) <= per_cluster(PROCESSES, POOL_MAX), max(totals)


def test_a_process_refuses_to_start_when_the_server_cannot_serve_the_cluster(
    pg_database: str, amqp_url: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGASIN_")}
    env.update(MAGASIN_API_KEYS=API_KEY, MAGASIN_DATABASE_URL=pg_database,
               MAGASIN_AMQP_URL=amqp_url, MAGASIN_PG_CLUSTER_PROCESSES="1000",
               MAGASIN_LOG_FORMAT="console")
    done = subprocess.run(
        [sys.executable, "-m", "magasin", "serve", "store", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "1000 processes may open 1000 × (10 + 1) = 11000 PostgreSQL connections" in output
    assert "raise max_connections" in output
