"""Counting hook for the distributed budget test, loaded by every service process the test
starts (this directory is put first on their PYTHONPATH, and Python imports a
`sitecustomize` module at start-up). Inert unless MAGASIN_BUDGET_COUNTING=1.

`magasin_budget_pg_statements_total{kind}` joins the process's own Prometheus registry, so
the test reads it from each process's `/metrics` with everything else: the SQL statements
the process sent to PostgreSQL (each `execute`/`fetch*` call, each row of an
`executemany`, each statement of a multi-statement simple query), by kind (`SELECT events`,
`magasin_commit`, ...). Statements that PL/pgSQL functions run inside the server are not
seen from here.
"""

from __future__ import annotations

import os
import re
import sys
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


_PLUMBING = ("/eventstore/postgres.py", "/eventstore/store.py", "/eventstore/window.py",
             "/asyncpg/", "/contextlib.py", "/asyncio/")


def caller() -> str:
    """The first function outside the store's plumbing that led to a statement (for
    MAGASIN_BUDGET_CALLERS=1): `module.function`."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/magasin/" in path and not any(p in path for p in _PLUMBING):
            module = path.rsplit("/magasin/", 1)[1].removesuffix(".py").replace("/", ".")
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def _statements(sql: str) -> list[str]:
    return [part for part in (p.strip() for p in sql.split(";")) if part]


def install() -> None:
    from asyncpg.connection import Connection
    from prometheus_client import Counter

    from magasin.observability.metrics import REGISTRY

    statements = Counter("magasin_budget_pg_statements_total",
                         "SQL statements sent to PostgreSQL (budget test only).", ["kind"],
                         registry=REGISTRY)
    by_caller = os.environ.get("MAGASIN_BUDGET_CALLERS") == "1"

    def kind(sql: str) -> str:
        return f"{statement_kind(sql)} <- {caller()}" if by_caller else statement_kind(sql)
    execute, execute_prepared = Connection.execute, Connection._execute
    execute_many = Connection._executemany

    async def counted_execute(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        if not args:  # the simple-query protocol; with args it goes through _execute
            for sql in _statements(query):
                statements.labels(kind(sql)).inc()
        return await execute(self, query, *args, **kw)

    async def counted_prepared(self: Any, query: str, args: Any, *rest: Any, **kw: Any) -> Any:
        statements.labels(kind(query)).inc()
        return await execute_prepared(self, query, args, *rest, **kw)

    async def counted_many(self: Any, query: str, args: Any, *rest: Any, **kw: Any) -> Any:
        rows = list(args)
        statements.labels(kind(query)).inc(len(rows))
        return await execute_many(self, query, rows, *rest, **kw)

    Connection.execute = counted_execute
    Connection._execute = counted_prepared
    Connection._executemany = counted_many


if os.environ.get("MAGASIN_BUDGET_COUNTING") == "1":
    install()
