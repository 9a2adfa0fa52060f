"""The SQLite store answers from what its own writer committed, and only while nobody else
committed since: a second store on the same file (another process, say) is always seen."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from magasin.eventstore import sqlite
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.store import NO_STREAM
from magasin.eventstore.window import LogWindow
from magasin.shared.errors import ConcurrencyError
from magasin.shared.messages import NewEvent


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    async with SqliteEventStore(tmp_path / "known.db") as store:
        yield store


def queries(store: SqliteEventStore) -> list[str]:
    """Statements the store's reading connection runs from now on."""
    seen: list[str] = []
    store._reader().set_trace_callback(seen.append)
    return seen


async def test_what_its_own_writer_committed_is_answered_without_a_query(
    db: SqliteEventStore,
) -> None:
    async with db.transaction() as uow:
        uow.append("cart-1", [NewEvent("A", {}), NewEvent("B", {})], NO_STREAM)
        uow.put_document("carts", "1", {"items": 2})
        uow.put_document("carts", "2", {"items": 0})
        uow.delete_document("carts", "2")
    read = queries(db)

    assert db.known_version("cart-1") == 2
    assert await db.stream_version("cart-1") == 2
    assert await db.get_document("carts", "1") == {"items": 2}
    assert await db.get_document("carts", "2") is None
    assert read == []
    assert db.known_version("cart-9") is None  # never written here: only a query can tell


async def test_a_document_handed_out_is_a_copy(db: SqliteEventStore) -> None:
    async with db.transaction() as uow:
        uow.put_document("carts", "1", {"items": [1]})
    (await db.get_document("carts", "1") or {})["items"].append(2)
    assert await db.get_document("carts", "1") == {"items": [1]}


async def test_another_writer_on_the_same_file_makes_it_ask_the_database_again(
    db: SqliteEventStore,
) -> None:
    await db.append("cart-1", [NewEvent("A", {})], NO_STREAM)
    async with db.transaction() as uow:
        uow.put_document("carts", "1", {"items": 1})

    async with SqliteEventStore(db.path) as other:
        await other.append("cart-1", [NewEvent("B", {})], 1)
        async with other.transaction() as uow:
            uow.put_document("carts", "1", {"items": 5})

    assert db.known_version("cart-1") is None
    assert await db.stream_version("cart-1") == 2
    assert await db.get_document("carts", "1") == {"items": 5}
    # Its own next commit knows the stream again (its version was read under the lock).
    await db.append("cart-1", [NewEvent("C", {})], 2)
    assert db.known_version("cart-1") == 3


async def test_a_cleared_collection_and_a_failed_unit_leave_nothing_stale(
    db: SqliteEventStore,
) -> None:
    async with db.transaction() as uow:
        uow.put_document("carts", "1", {"items": 1})
        uow.append("cart-1", [NewEvent("A", {})], NO_STREAM)
    async with db.transaction() as uow:
        uow.clear_collection("carts")
    assert await db.get_document("carts", "1") is None

    with pytest.raises(ConcurrencyError):
        async with db.transaction() as uow:
            uow.put_document("carts", "1", {"items": 9})
            uow.append("cart-1", [NewEvent("B", {})], NO_STREAM)
    assert await db.get_document("carts", "1") is None
    assert db.known_version("cart-1") == 1


async def test_a_stream_written_before_it_opened_is_appended_after_its_last_event(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "log.db") as before:
        await before.append("cart-1", [NewEvent("A", {}), NewEvent("B", {})], NO_STREAM)
        stored = await before.append("cart-2", [NewEvent("A", {})], NO_STREAM)

    async with SqliteEventStore(tmp_path / "log.db") as db:
        # It never wrote these streams: not known, so asked (or checked by the insert).
        (any_version,) = await db.append("cart-1", [NewEvent("C", {})])
        with pytest.raises(ConcurrencyError):
            await db.append("cart-2", [NewEvent("B", {})], NO_STREAM)
        again = await db.append("cart-2", [NewEvent("A", {}, event_id=stored[0].event_id)])

    assert any_version.stream_version == 3
    assert [e.event_id for e in again] == [stored[0].event_id]


async def test_the_log_window_takes_this_process_commits_without_reading_them(
    db: SqliteEventStore,
) -> None:
    window = LogWindow(db, size=100)
    await db.append("cart-1", [NewEvent("A", {})], NO_STREAM)
    assert [e.type for e in await window.read(0, 10)] == ["A"]  # read once, then held
    read = queries(db)

    await db.append("cart-1", [NewEvent("B", {}), NewEvent("C", {})], 1)
    assert [e.type for e in await window.read(1, 10)] == ["B", "C"]
    assert read == []

    # Another writer's events leave a hole before this process's next ones: read them.
    async with SqliteEventStore(db.path) as other:
        await other.append("cart-2", [NewEvent("X", {})], NO_STREAM)
    await db.append("cart-1", [NewEvent("D", {})], 3)
    assert [e.type for e in await window.read(3, 10)] == ["X", "D"]
    assert read


async def test_commits_leave_the_loop_for_the_writer_thread_while_the_disk_is_slow(
    db: SqliteEventStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert db._wconn is not None
    threads: list[str] = []
    db._wconn.set_trace_callback(lambda sql: threads.append(threading.current_thread().name)
                                 if sql.startswith("INSERT INTO events") else None)
    loop_thread = threading.current_thread().name
    monkeypatch.setattr(sqlite, "LOOP_COMMIT_RETRY_EVERY", 10_000)

    async def burst(first: int) -> set[str]:
        """Eight concurrent commits (a group, a lone one or two): the threads that ran them."""
        threads.clear()
        await asyncio.gather(*(db.append(f"cart-{i}", [NewEvent("A", {})], NO_STREAM)
                               for i in range(first, first + 8)))
        return set(threads)

    assert await burst(0) == {loop_thread}  # a fast disk: the groups commit on the loop

    slow = sqlite.LOOP_COMMIT_MAX_S * 2
    apply_jobs = db._apply_jobs

    def slow_disk(jobs: Any) -> Any:
        time.sleep(slow)
        return apply_jobs(jobs)

    monkeypatch.setattr(db, "_apply_jobs", slow_disk)
    monkeypatch.setattr(db, "_append_alone", lambda operations: None)
    for first in range(100, 400, 100):
        await db.append(f"cart-{first}", [NewEvent("A", {})], NO_STREAM)
        await burst(first + 1)
    assert loop_thread not in await burst(500)  # the loop's commits took too long

    monkeypatch.setattr(db, "_apply_jobs", apply_jobs)  # the disk is fast again
    assert loop_thread not in await burst(550)  # the store does not know it yet
    monkeypatch.setattr(sqlite, "LOOP_COMMIT_RETRY_EVERY", 4)
    for first in range(600, 900, 100):
        await burst(first)
    assert await burst(1000) == {loop_thread}  # a retry on the loop found it so


async def test_a_lone_commit_runs_on_the_loop_and_a_burst_is_still_grouped(
    db: SqliteEventStore,
) -> None:
    assert db._wconn is not None
    threads: list[str] = []
    statements: list[str] = []

    def traced(sql: str) -> None:
        statements.append(sql.split(" (")[0])
        if sql.startswith("INSERT INTO events"):
            threads.append(threading.current_thread().name)

    db._wconn.set_trace_callback(traced)

    await db.append("cart-1", [NewEvent("A", {})], NO_STREAM)
    assert threads == [threading.current_thread().name]  # no hop to the writer thread
    # Events alone are one INSERT, a transaction by itself: no BEGIN, no COMMIT.
    assert statements == ["INSERT INTO events"]

    threads.clear()
    await asyncio.gather(*(db.append(f"cart-{i}", [NewEvent("A", {})], NO_STREAM)
                           for i in range(2, 10)))
    assert len(threads) <= 2  # eight commits in one or two transactions, not eight
    assert [await db.stream_version(f"cart-{i}") for i in range(2, 10)] == [1] * 8


async def test_an_append_that_another_writer_overtakes_unlocked_is_redone_under_the_lock(
    db: SqliteEventStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone append runs without BEGIN IMMEDIATE, so another connection may commit
    between what the writer knows and its INSERT: the positions it took collide, and the
    append is made again under the write lock, after the other's events."""
    await db.append("cart-1", [NewEvent("A", {})], NO_STREAM)
    known = db._known
    trusted = known.trusted

    def overtaken() -> bool:
        answer = trusted()  # what the writer knew: head 1, cart-1 at 1
        monkeypatch.setattr(known, "trusted", trusted)
        other = sqlite3.connect(db.path, isolation_level=None)
        other.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, type, schema_version,"
            " occurred_at, metadata, payload) VALUES ('other-1', 'cart-1', 2, 'X', 1, 0,"
            " '{}', '{}')")
        other.close()
        return answer

    monkeypatch.setattr(known, "trusted", overtaken)
    with pytest.raises(ConcurrencyError):
        await db.append("cart-1", [NewEvent("B", {})], 1)  # cart-1 is at 2 now
    recorded = await db.append("cart-1", [NewEvent("C", {})])
    assert [(e.type, e.stream_version, e.global_position) for e in recorded] == [("C", 3, 3)]
    assert [e.type for e in await db.read_stream("cart-1")] == ["A", "X", "C"]


CHILD_WRITER = """
import mmap, os, sqlite3, struct, sys
database, target, tear = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "tear"
conn = sqlite3.connect(database, isolation_level=None)
conn.execute("SELECT COUNT(*) FROM documents").fetchone()  # joins the WAL index
shm = mmap.mmap(os.open(database + "-shm", os.O_RDWR), mmap.PAGESIZE)
# (kept open: closing a descriptor of the -shm file would drop this process's locks)
if tear:  # the two copies of the header differ, as when a writer died between them
    shm[48 + 8] ^= 0xFF
    conn.execute("SELECT COUNT(*) FROM documents").fetchone()  # rebuilds the index
def counter():
    return struct.unpack_from("=III", shm, 0)[2]
filler = 0
while counter() < target - 1 and filler < 10_000:  # only if the WAL index was rebuilt
    filler += 1
    conn.execute("INSERT OR REPLACE INTO documents VALUES ('filler', 'f', ?)", (str(filler),))
conn.execute("UPDATE documents SET body = '{\\"items\\": 2}' WHERE collection = 'carts'")
print(counter(), filler)
"""


@pytest.mark.parametrize("how", ["connects", "tear"])
async def test_another_process_writing_is_seen_whatever_becomes_of_the_commit_counter(
    db: SqliteEventStore, how: str,
) -> None:
    """Another process (a CLI, a test polling the file) connects while the store is open,
    then commits: the store must see what it wrote, even when that process rebuilt the WAL
    index, which restarts the commit counter (`tear`: a writer died halfway through the
    header), and committed until the counter stood where the store's writer left it.

    `connects`: SQLite's locks on the WAL index (POSIX locks, held per process) tell that
    process it is not the first connection. Had the store dropped them (closing any
    descriptor of the -shm file drops every lock this process holds on it), that process
    would rebuild the index from scratch under the running store on connecting — also
    truncating the -shm file the store maps: `magasin up` died of SIGBUS mid-sale."""
    async with db.transaction() as uow:
        uow.put_document("carts", "1", {"items": 1})
    for i in range(5):  # the counter well above where a rebuilt index starts
        async with db.transaction() as uow:
            uow.put_document("other", str(i), {})
    assert await db.get_document("carts", "1") == {"items": 1}
    target = db._known.counter()
    assert target is not None

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_WRITER, str(db.path), str(target), how,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()

    assert await db.get_document("carts", "1") == {"items": 2}, out.decode()
