"""Fixtures for real servers: each test run gets its own PostgreSQL database and RabbitMQ
name prefix, removed afterwards. With CI=true an unreachable server fails the tests that
need it; elsewhere they are skipped with the reason."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

PG_ADMIN_URL = os.environ.get(
    "MAGASIN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("MAGASIN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RUN_ID = uuid.uuid4().hex[:10]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when an event loop is running in
    this thread (async fixtures request the session fixtures below lazily)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def server_missing(what: str, exc: BaseException) -> None:
    message = f"{what} is unreachable: {exc!r}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: tests needing it must run)")
    pytest.skip(message)


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database for this test run; yields its URL."""
    name = f"magasin_test_{RUN_ID}"
    try:
        run_sync(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (TimeoutError, OSError) as exc:
        server_missing("PostgreSQL", exc)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    run_sync(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_schema() -> str:
    """A schema name unique to one test, so tests share the run's database but not tables."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def amqp_namespace() -> str:
    """A name prefix for exchanges and queues unique to one test of this run."""
    return f"magasin-test-{RUN_ID}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def amqp_url() -> str:
    import aio_pika

    async def probe() -> None:
        conn = await aio_pika.connect(AMQP_URL, timeout=5)
        await conn.close()

    try:
        run_sync(probe())
    except Exception as exc:
        server_missing("RabbitMQ", exc)
    return AMQP_URL


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "magasin.db"


STORE_KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORE_KINDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[object]:
    """A function `make(outbox=False)` that opens an event store of the parametrized kind;
    every store it made is closed (and its schema dropped) after the test."""
    from magasin.eventstore.store import EventStore

    made: list[EventStore] = []
    kind = request.param
    if kind == "postgres":
        url = request.getfixturevalue("pg_database")
        schema = request.getfixturevalue("pg_schema")

    async def make(outbox: bool = False) -> EventStore:
        store: EventStore
        if kind == "sqlite":
            from magasin.eventstore.sqlite import SqliteEventStore

            store = SqliteEventStore(tmp_path / "magasin.db", outbox=outbox)
        else:
            from magasin.eventstore.postgres import PostgresEventStore

            store = PostgresEventStore(url, schema=schema, outbox=outbox)
        await store.open()
        made.append(store)
        return store

    make.kind = kind  # type: ignore[attr-defined]
    yield make
    for store in reversed(made):
        await store.close()
    if kind == "postgres":
        await _drop_schema(url, schema)


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(store_factory: object) -> object:
    """An open event store of each kind (see store_factory)."""
    return await store_factory()  # type: ignore[operator]
