"""Counting hooks for the distributed budget test, loaded by every service process the test
starts (this directory is put first on their PYTHONPATH, and Python imports a
`sitecustomize` module at start-up). Inert unless MAGASIN_BUDGET_COUNTING=1.

The counts join the process's own Prometheus registry, so the test reads them from each
process's `/metrics` with everything else:

- `magasin_budget_pg_statements_total{kind}`: SQL statements the process sent to
  PostgreSQL (each `execute`/`fetch*` call, each row of an `executemany`, each statement of
  a multi-statement simple query), by kind (`SELECT`, `INSERT`, `magasin_commit`, ...).
  Statements that PL/pgSQL functions run inside the server are not seen from here.
- `magasin_budget_units_of_work_total`: non-empty units of work the event store committed
  (calls of its `commit`, whatever number of transactions or round trips it takes).

With MAGASIN_BUDGET_POOL_MAX=n, each store's connection pool holds at most n connections:
six services at the default 10 (+1 listener) each would take two thirds of the shared test
server's 100; one sale at a time needs far fewer.
"""

from __future__ import annotations

import os
import re
from typing import Any

_FUNCTION = re.compile(r"\b(magasin_\w+)\s*\(")
_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+([\w.\"]+)", re.IGNORECASE)


def statement_kind(sql: str) -> str:
    """A short label for `sql`: the magasin function it calls, else its verb and table."""
    called = _FUNCTION.search(sql)
    if called:
        return called.group(1)
    words = sql.split(None, 1)
    verb = words[0].upper() if words else "?"
    table = _TABLE.search(sql)
    return f"{verb} {table.group(1).strip(chr(34))}" if table else verb


def _statements(sql: str) -> list[str]:
    return [part for part in (p.strip() for p in sql.split(";")) if part]


def install() -> None:
    from asyncpg.connection import Connection
    from prometheus_client import Counter

    from magasin.eventstore.postgres import PostgresEventStore
    from magasin.observability.metrics import REGISTRY

    statements = Counter("magasin_budget_pg_statements_total",
                         "SQL statements sent to PostgreSQL (budget test only).", ["kind"],
                         registry=REGISTRY)
    units = Counter("magasin_budget_units_of_work_total",
                    "Non-empty units of work committed (budget test only).", registry=REGISTRY)

    execute, execute_prepared = Connection.execute, Connection._execute
    execute_many, commit = Connection._executemany, PostgresEventStore.commit
    init = PostgresEventStore.__init__
    pool_max = int(os.environ.get("MAGASIN_BUDGET_POOL_MAX", "0"))

    def capped_init(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        if pool_max:
            self._pool_max = min(self._pool_max, pool_max)
            self._pool_min = min(self._pool_min, pool_max)

    async def counted_execute(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        if not args:  # the simple-query protocol; with args it goes through _execute
            for sql in _statements(query):
                statements.labels(statement_kind(sql)).inc()
        return await execute(self, query, *args, **kw)

    async def counted_prepared(self: Any, query: str, args: Any, *rest: Any, **kw: Any) -> Any:
        statements.labels(statement_kind(query)).inc()
        return await execute_prepared(self, query, args, *rest, **kw)

    async def counted_many(self: Any, query: str, args: Any, *rest: Any, **kw: Any) -> Any:
        rows = list(args)
        statements.labels(statement_kind(query)).inc(len(rows))
        return await execute_many(self, query, rows, *rest, **kw)

    async def counted_commit(self: Any, operations: Any) -> Any:
        if operations:
            units.inc()
        return await commit(self, operations)

    Connection.execute = counted_execute
    Connection._execute = counted_prepared
    Connection._executemany = counted_many
    PostgresEventStore.commit = counted_commit  # type: ignore[method-assign]
    PostgresEventStore.__init__ = capped_init  # type: ignore[method-assign]


if os.environ.get("MAGASIN_BUDGET_COUNTING") == "1":
    install()
