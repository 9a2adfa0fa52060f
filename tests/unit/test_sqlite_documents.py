"""What one write of documents costs SQLite does not grow with the documents stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from magasin.eventstore.sqlite import SCHEMA
from magasin.eventstore.sqlite_group import write_documents


def vm_steps(conn: sqlite3.Connection, documents: dict[tuple[str, str], dict | None]) -> int:
    """SQLite virtual machine instructions the write ran (a scan of the table runs one or
    more per row; a primary key lookup a few per level of the tree)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    try:
        write_documents(conn, documents)
    finally:
        conn.set_progress_handler(None, 1)
    return steps


def test_deleting_several_documents_costs_the_same_with_many_stored(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "d.db", isolation_level=None)
    conn.executescript(SCHEMA)
    costs = []
    for stored in (100, 20_000):
        conn.execute("DELETE FROM documents")
        write_documents(conn, {("sagas", f"{n:08}"): {"n": n} for n in range(stored)})
        gone = {("sagas", f"{n:08}"): None for n in (3, 50, 97)}
        costs.append(vm_steps(conn, gone))
        remaining = conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        assert remaining == stored - 3
    # 200 times the documents: a scan would cost about 200 times more; lookups, a little.
    assert costs[1] < 2 * costs[0], costs
