"""SQLite adapter of the event store (embedded mode): one file, WAL, one writer, group commit.

All writes go through one writer connection. Units of work queued while a commit is
running are committed together in the next database transaction, as one group in a few
statements (sqlite_group), or, when one of them fails, each inside its own SAVEPOINT so
that one failing unit (a version conflict, say) does not fail the others. This gives one
fsync for many concurrent appends. They run on the event loop's thread while a commit
takes less than a GIL switch interval there, and on the writer thread on a disk slower
than that (see `_loop_may_commit`). Reads run on the caller's
thread with a connection of their own (WAL lets them read while the writer writes), or
not at all when the writer knows the answer (sqlite_known). Positions are assigned by the
single writer in commit order, so the global log has no gaps in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from itertools import starmap
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from magasin.eventstore import sqlite_group
from magasin.eventstore.rows import (
    ENVELOPE_COLUMNS,
    EVENT_COLUMNS,
    StoredEvent,
    collector_paused,
    dumps,
    event_from_row,
)
from magasin.eventstore.sqlite_known import UNKNOWN, KnownState
from magasin.eventstore.store import (
    AbstractOutboxBatch,
    Append,
    ClearCollection,
    DeleteDocument,
    EventFilter,
    EventStore,
    ExpectVersion,
    LogReader,
    MarkProcessed,
    Operation,
    PutDocument,
    ReplaceCollection,
    SetCheckpoint,
    Snapshot,
)
from magasin.shared.clock import from_micros, to_micros, utcnow
from magasin.shared.errors import (
    AlreadyProcessed,
    ConcurrencyError,
    DuplicateEventError,
    MagasinError,
    NotFound,
    StorageError,
)
from magasin.shared.messages import JsonDict, RecordedEvent

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    global_position INTEGER PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    stream_id       TEXT NOT NULL,
    stream_version  INTEGER NOT NULL,
    type            TEXT NOT NULL,
    schema_version  INTEGER NOT NULL,
    occurred_at     INTEGER NOT NULL,
    correlation_id  TEXT,
    causation_id    TEXT,
    traceparent     TEXT,
    metadata        TEXT NOT NULL,
    payload         TEXT NOT NULL,
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX IF NOT EXISTS events_correlation ON events (correlation_id);
CREATE TABLE IF NOT EXISTS stream_snapshots (
    stream_id      TEXT NOT NULL,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state          TEXT NOT NULL,
    taken_at       INTEGER NOT NULL,
    event_at       INTEGER,
    PRIMARY KEY (stream_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT NOT NULL,
    key        TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (collection, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    global_position INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS outbox_log (
    global_position INTEGER PRIMARY KEY
);
"""

_SELECT_EVENTS = f"SELECT {EVENT_COLUMNS} FROM events"
_READ_EVENTS = f"SELECT {ENVELOPE_COLUMNS} FROM events"
"""Reads select in StoredEvent's argument order: starmap(StoredEvent, cursor) is the
cheapest conversion (no Python frame per row)."""
_INSERT_EVENT = (
    "INSERT INTO events (global_position, event_id, stream_id, stream_version, type, "
    "schema_version, occurred_at, correlation_id, causation_id, traceparent, metadata, payload) "
    "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_LOAD_LATEST = (
    "SELECT * FROM (SELECT 0, version, schema_version, state, taken_at, event_at, NULL, NULL,"
    " NULL, NULL, NULL, NULL, NULL FROM stream_snapshots WHERE stream_id = ?1"
    " ORDER BY version DESC LIMIT 1)"
    f" UNION ALL SELECT 1, {ENVELOPE_COLUMNS} FROM events WHERE stream_id = ?1"
    " AND stream_version > COALESCE("
    "(SELECT MAX(version) FROM stream_snapshots WHERE stream_id = ?1), 0)"
    " ORDER BY 1, 6"
)
"""A stream's latest snapshot (first, tagged 0) and the events after it (tagged 1, in
version order: the sixth column is stream_version), in one statement."""

ROWS_PER_STATEMENT = 200
"""Rows of one multi-row INSERT or DELETE (3 parameters a row, well under SQLite's limit)."""

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

LOOP_COMMIT_MAX_S = 0.005
"""Longest a commit may hold the event loop, on average (CPython's GIL switch interval: a
commit on the writer thread can make the loop's tasks wait as long at each statement)."""
LOOP_COMMIT_RETRY_EVERY = 200
"""While the commits go to the writer thread, one group in this many tries the loop again."""


def _event(row: Any) -> RecordedEvent:
    return event_from_row(row)


def _others_ready() -> bool:
    """Whether another callback would run before this task resumed from `sleep(0)`. The
    standard loop tells: its `_ready` queue holds what is left of this turn and what is due
    in the next, and a callback that I/O or a timer adds in the next turn runs after this
    task's. If it is empty, the turn `sleep(0)` gives lets no other task start a commit:
    skipping it changes no grouping and saves a turn of the loop (~7 us of a lone writer's
    ~210 us append, bench/eventstore.py). Other loops (uvloop) do not tell: yes."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is None or bool(ready)


class SqliteEventStore(EventStore):
    """Event store in one SQLite file. `synchronous="FULL"` fsyncs every commit (durable
    against power loss); NORMAL survives a process crash but not a power cut."""

    wakes_for_other_processes = False  # another process's commits are seen by polling

    def __init__(
        self,
        path: str | Path,
        *,
        outbox: bool = False,
        synchronous: Synchronous = "FULL",
        max_batch: int = 256,
    ) -> None:
        self.path = Path(path)
        self.outbox = outbox
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._rconn: sqlite3.Connection | None = None
        self._wconn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[tuple[Sequence[Operation], asyncio.Future[Any]]] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._new_events: asyncio.Event | None = None
        self._outbox_locks: tuple[asyncio.Lock, asyncio.Lock] | None = None
        """The outbox's two stages' claim locks (see outbox_batch)."""
        self._last_position = 0
        self._known = KnownState()
        self._wlock = threading.Lock()
        self._commits = 0
        """Transactions the writer committed that changed something (see KnownState)."""
        self._inserted: list[RecordedEvent] = []
        """Events the writer inserted in its current call (not those a retry got back)."""
        self._loop_commit_s = 0.0
        """How long a commit held the event loop, a moving average (see _loop_may_commit)."""
        self._groups_asked = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._committer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue = asyncio.Queue()
        self._new_events = asyncio.Event()
        self._outbox_locks = (asyncio.Lock(), asyncio.Lock())
        self._last_position = await self._in_writer(self._open_writer)
        self._committer = asyncio.create_task(self._commit_loop(), name="sqlite-committer")

    async def close(self) -> None:
        if self._committer is None:
            return
        self._committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._committer
        self._committer = None
        await self._in_writer(self._close_writer)
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None
        # Last, with both connections closed: letting go of the -shm mapping may close a
        # descriptor of that file, which drops this process's locks on it (see sqlite_known).
        self._known.close()
        self._queue = None
        self._writer.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        return conn

    def _open_writer(self) -> int:
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
        self._wconn = conn
        self._known.open(self.path)
        row = conn.execute("SELECT COALESCE(MAX(global_position), 0) FROM events").fetchone()
        self._known.head = int(row[0])
        return int(row[0])

    def _close_writer(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    async def _in_writer(self, fn: Any, *args: Any) -> Any:
        if self._queue is None:
            raise StorageError("the SQLite event store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._writer, self._locked, fn, *args)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc

    def _locked(self, fn: Any, *args: Any) -> Any:
        """The writer connection is used by one thread at a time: the writer thread, or
        the event loop's for a commit while the writer is idle (see `commit`)."""
        with self._wlock:
            return fn(*args)

    def _reader(self) -> sqlite3.Connection:
        # Reads run on the event loop's thread: in WAL mode a reader never waits for the
        # writer, and these are index lookups or bounded pages, far cheaper than the hop to
        # a thread and back (which cost more than the query itself, measured).
        if self._rconn is None:
            if self._queue is None:
                raise StorageError("the SQLite event store is not open")
            self._rconn = self._connect()
            self._rconn.execute("PRAGMA query_only = 1")
        return self._rconn

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._reader()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc

    async def _read_events(self, sql: str, params: Sequence[Any]) -> list[RecordedEvent]:
        """Envelopes of the rows `sql` selects (in _READ_EVENTS' column order), with the
        collector paused (see rows.collector_paused). fetchall, then starmap: iterating
        the cursor instead cost 15 % more, measured."""
        conn = self._reader()
        try:
            with collector_paused():
                return list(starmap(StoredEvent, conn.execute(sql, params).fetchall()))
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc

    # -- writes: group commit -----------------------------------------------------------

    async def commit(self, operations: Sequence[Operation]) -> list[RecordedEvent]:
        if self._queue is None:
            raise StorageError("the SQLite event store is not open")
        if self._alone():
            # Let the tasks that are ready run first: a burst of commits then goes in one
            # group (group commit), with one fsync.
            if _others_ready():
                await asyncio.sleep(0)
            if (self._alone() and self._loop_commit_s <= LOOP_COMMIT_MAX_S
                    and self._wlock.acquire(blocking=False)):
                # Nobody else is preparing a commit and the writer is idle: nothing to
                # group this one with, nothing for the loop to do meanwhile, so commit
                # here rather than pay the hop to the writer thread and back (which cost
                # more than the write itself: bench/eventstore.py append_1_writer).
                outcomes, last, fresh = self._on_loop(
                    lambda: self._append_alone(operations) or self._apply_jobs([operations]))
                self._published(last, fresh)
                outcome = outcomes[0]
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        await self._queue.put((operations, future))
        return await future

    def _loop_may_commit(self) -> bool:
        """Whether the committer's next group runs on the event loop's thread (a lone
        commit does when the first condition below holds; slower, it queues here). There
        it stops every task for as long as it takes, fsync included. On the writer
        thread the loop runs meanwhile, but the thread takes the GIL back after each
        statement, and a busy loop keeps it for up to a switch interval each time. At 222
        sales/s (half the embedded maximum on this machine) the payment step, which waits
        for two commits, took 8-22 ms (p50) with the groups on the thread and 1.7-2.1 on
        the loop, in 3 alternations; the sales' p99 fell 101-178 -> 64-123 ms. So: the
        loop while its commits take less than LOOP_COMMIT_MAX_S on average; the thread on
        a disk slower than that, the loop tried again every LOOP_COMMIT_RETRY_EVERY
        groups."""
        self._groups_asked += 1
        return (self._loop_commit_s <= LOOP_COMMIT_MAX_S
                or self._groups_asked % LOOP_COMMIT_RETRY_EVERY == 0)

    def _on_loop(self, commit: Callable[[], T]) -> T:
        """`commit()` on the event loop's thread, the write lock (taken by the caller)
        released after it, timed into `_loop_commit_s`."""
        started = time.perf_counter()
        try:
            return commit()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc
        finally:
            self._wlock.release()
            took = time.perf_counter() - started
            if self._loop_commit_s > LOOP_COMMIT_MAX_S:
                self._loop_commit_s = took  # a retry: the disk's speed now
            else:
                self._loop_commit_s += (took - self._loop_commit_s) / 8

    def _alone(self) -> bool:
        """No other unit of work open, none queued, the writer idle."""
        assert self._queue is not None
        return self.units_open <= 1 and self._queue.empty() and not self._wlock.locked()

    async def _commit_loop(self) -> None:
        assert self._queue is not None and self._new_events is not None
        while True:
            jobs = [await self._queue.get()]
            try:
                await asyncio.sleep(0)  # the tasks already ready may queue theirs: one commit
            except asyncio.CancelledError:
                jobs[0][1].set_exception(StorageError("the SQLite event store closed"))
                raise
            while len(jobs) < self._max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                if self._loop_may_commit() and self._wlock.acquire(blocking=False):
                    outcomes, last, fresh = self._on_loop(
                        partial(self._apply_jobs, [ops for ops, _ in jobs]))
                else:
                    outcomes, last, fresh = await self._in_writer(
                        self._apply_jobs, [ops for ops, _ in jobs])
            except Exception as exc:
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(jobs, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self._published(last, fresh)

    def _published(self, last: int, fresh: list[RecordedEvent]) -> None:
        """After a commit: the new head; the events it inserted (in log order, consecutive
        positions) told to the commits' followers; the waiters woken."""
        self._saw(fresh)
        if last > self._last_position:
            assert self._new_events is not None
            self._last_position = last
            self._new_events.set()
            self._new_events = asyncio.Event()

    def _append_alone(
        self, operations: Sequence[Operation]
    ) -> tuple[list[list[RecordedEvent] | MagasinError], int, list[RecordedEvent]] | None:
        """`_apply_jobs([operations])` the short way when the unit is one append
        (sqlite_group.append_alone), noting what it leaves behind for the readers; None if
        it must take the general path (nothing written)."""
        if self.outbox or len(operations) != 1 or type(op := operations[0]) is not Append:
            return None
        conn = self._wconn
        assert conn is not None
        before = self._known.stamp()
        recorded = sqlite_group.append_alone(conn, op, self._known)
        if recorded is None:
            return None
        self._commits += 1
        last = recorded[-1]
        self._known.settle(before, 1, {last.stream_id: last.stream_version}, {},
                           head=last.global_position)
        return [recorded], last.global_position, recorded

    def _apply_jobs(
        self, jobs: list[Sequence[Operation]]
    ) -> tuple[list[list[RecordedEvent] | MagasinError], int, list[RecordedEvent]]:
        """`_commit_jobs`, noting what it leaves behind for the readers (see KnownState);
        also returns the events it inserted, in log order."""
        before, commits = self._known.stamp(), self._commits
        self._inserted = []
        outcomes, position = self._commit_jobs(jobs)
        inserted = {id(e) for e in self._inserted}  # not the stored ones a retry got back
        versions: dict[str, int] = {}
        documents: dict[tuple[str, str], str | None] = {}
        cleared = False
        fresh: list[RecordedEvent] = []
        for ops, outcome in zip(jobs, outcomes, strict=False):
            if not isinstance(outcome, list):
                continue
            for event in outcome:
                if id(event) in inserted:
                    versions[event.stream_id] = event.stream_version
                    fresh.append(event)
            for op in ops:
                if isinstance(op, PutDocument):
                    documents[op.collection, op.key] = dumps(op.body)
                elif isinstance(op, DeleteDocument):
                    documents[op.collection, op.key] = None
                elif isinstance(op, ClearCollection | ReplaceCollection):
                    documents.clear()
                    cleared = True
        if len(fresh) > 1:
            fresh.sort(key=lambda e: e.global_position)
        head = fresh[-1].global_position if fresh else None
        self._known.settle(before, self._commits - commits, versions, documents, cleared, head)
        return outcomes, position, fresh

    def _tracked(self, fn: Any) -> Any:
        """Run a write of the writer thread that is no unit of work (a snapshot, outbox
        rows), counting its commit so that it is not taken for another connection's."""
        conn = self._wconn
        assert conn is not None
        before, changes = self._known.stamp(), conn.total_changes
        try:
            return fn()
        finally:
            commits = int(conn.total_changes != changes)
            self._known.settle(before, commits, {}, {})

    def _commit_jobs(
        self, jobs: list[Sequence[Operation]]
    ) -> tuple[list[list[RecordedEvent] | MagasinError], int]:
        """Commit `jobs` in one transaction. Optimistically as one group, a statement per
        kind of write for all of them (see sqlite_group; a failing job is rare: a version
        conflict, a duplicate); if that does not apply, the transaction rolls back and the
        jobs run again one by one, each in its own SAVEPOINT, so the others commit."""
        grouped = self._run_group(jobs)
        if grouped is not None:
            return grouped, self._last_of(grouped)
        try:
            outcomes = self._run_jobs(jobs, isolate=len(jobs) > 1)
        except MagasinError as exc:
            return [exc], 0
        return outcomes, self._last_of(outcomes)

    @staticmethod
    def _last_of(outcomes: list[list[RecordedEvent] | MagasinError]) -> int:
        return max(
            (r[-1].global_position for r in outcomes if isinstance(r, list) and r), default=0
        )

    def _run_group(
        self, jobs: list[Sequence[Operation]]
    ) -> list[list[RecordedEvent] | MagasinError] | None:
        """The jobs applied as one group, or None (nothing written) if they cannot be."""
        conn = self._wconn
        assert conn is not None
        try:
            group = sqlite_group.plan(jobs)
        except sqlite_group.Unmergeable:
            return None
        now = to_micros(utcnow()) if group.marks else 0
        changes = conn.total_changes
        appends_alone = sqlite_group.appends_alone(group, outbox=self.outbox)
        if appends_alone or sqlite_group.single_statement_is_atomic(group):
            # One statement, in autocommit: BEGIN and COMMIT would be two more calls for
            # the same transaction (a lone writer's append: bench/eventstore.py). What
            # the writer knows is read without the write lock: see appends_alone.
            known = self._known if appends_alone and self._known.trusted() else None
            try:
                done: list[list[RecordedEvent] | MagasinError] = list(sqlite_group.apply_group(
                    conn, group, len(jobs), outbox=self.outbox, now=now, known=known))
            except (sqlite_group.Unmergeable, MagasinError):
                return None
            finally:
                self._commits += conn.total_changes != changes
            self._inserted += (e for r in done if isinstance(r, list) for e in r)
            return done
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Holding the write lock: if nobody else committed since this writer last did,
            # what it knows of the log's head and its streams' versions is exact.
            known = self._known if self._known.trusted() else None
            recorded = sqlite_group.apply_group(conn, group, len(jobs), outbox=self.outbox,
                                                now=now, known=known)
            wrote = conn.total_changes != changes
            conn.execute("COMMIT")
            self._commits += wrote
            self._inserted += (e for r in recorded for e in r)
        except (sqlite_group.Unmergeable, MagasinError):
            conn.execute("ROLLBACK")
            return None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return list(recorded)

    def _run_jobs(
        self, jobs: list[Sequence[Operation]], *, isolate: bool
    ) -> list[list[RecordedEvent] | MagasinError]:
        """One transaction; without `isolate`, any job's MagasinError rolls it all back
        and propagates."""
        conn = self._wconn
        assert conn is not None
        outcomes: list[list[RecordedEvent] | MagasinError] = []
        conn.execute("BEGIN IMMEDIATE")
        changes = conn.total_changes
        try:
            for ops in jobs:
                if isolate:
                    conn.execute("SAVEPOINT job")
                try:
                    outcomes.append(self._apply(conn, ops))
                except MagasinError as exc:
                    if not isolate:
                        raise
                    conn.execute("ROLLBACK TO job")
                    outcomes.append(exc)
                if isolate:
                    conn.execute("RELEASE job")
            wrote = conn.total_changes != changes
            conn.execute("COMMIT")
            self._commits += wrote
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _apply(self, conn: sqlite3.Connection, ops: Sequence[Operation]) -> list[RecordedEvent]:
        """One job's operations. Without collection-wide operations, the job's statements
        are grouped: its inbox marks first (one INSERT), its appends and checkpoints in
        order, then the final state of each document it touched (one upsert, one DELETE)
        — the same outcome, all or nothing, in far fewer statements."""
        checks = [op for op in ops if isinstance(op, ExpectVersion)]
        if checks:  # against the versions before this job's appends
            self._check_versions(conn, checks)
        if any(isinstance(op, ClearCollection | ReplaceCollection) for op in ops):
            return self._apply_in_order(conn, ops)
        marks: list[tuple[str, str]] = []
        documents: dict[tuple[str, str], Mapping[str, Any] | None] = {}
        rest: list[Append | SetCheckpoint] = []
        for op in ops:
            if isinstance(op, PutDocument):
                documents[op.collection, op.key] = op.body
            elif isinstance(op, DeleteDocument):
                documents[op.collection, op.key] = None
            elif isinstance(op, MarkProcessed):
                marks.append((op.consumer, op.event_id))
            elif isinstance(op, Append | SetCheckpoint):
                rest.append(op)
        if marks:
            self._mark(conn, marks)
        recorded: list[RecordedEvent] = []
        guards = [op for op in rest if isinstance(op, SetCheckpoint) and op.expected is not None
                  and op.expected == op.position]
        mover = next((op for op in rest if isinstance(op, SetCheckpoint)
                      and op.expected is not None and op.expected != op.position), None)
        if mover is not None and guards and self._move_guarded(conn, mover, guards):
            rest = [op for op in rest if op is not mover and op not in guards]
        for op in rest:
            if isinstance(op, Append):
                recorded.extend(self._append(conn, op))
            else:
                self._set_checkpoint(conn, op)
        if documents:
            sqlite_group.write_documents(conn, documents)
        return recorded

    @staticmethod
    def _check_versions(conn: sqlite3.Connection, checks: list[ExpectVersion]) -> None:
        """Every stream at its expected version, in one statement."""
        wanted = {op.stream_id: op.version for op in checks}
        marks = ",".join("?" * len(wanted))
        actual = dict.fromkeys(wanted, 0)
        actual.update(conn.execute(
            f"SELECT stream_id, MAX(stream_version) FROM events WHERE stream_id IN ({marks}) "
            "GROUP BY stream_id", list(wanted)).fetchall())
        for op in checks:
            now = int(actual[op.stream_id])
            if now != op.version and (op.before is None or now < op.version or conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = ? AND "
                    "stream_version > ? AND global_position <= ?)",
                    (op.stream_id, op.version, op.before)).fetchone()[0]):
                raise ConcurrencyError(op.stream_id, op.version, now)

    @staticmethod
    def _move_guarded(
        conn: sqlite3.Connection, mover: SetCheckpoint, guards: list[SetCheckpoint]
    ) -> bool:
        """Move `mover` and check that each guard stands at its value, in one UPDATE (a
        projection's checkpoint and its generation); False when it did not apply, and the
        caller then runs them one by one to learn which failed."""
        sql = ("UPDATE checkpoints SET position = ? WHERE name = ? AND position = ?"
               + " AND COALESCE((SELECT position FROM checkpoints WHERE name = ?), 0) = ?"
               * len(guards))
        params: list[Any] = [mover.position, mover.name, mover.expected]
        for guard in guards:
            params += [guard.name, guard.expected]
        return bool(conn.execute(sql, params).rowcount == 1)

    @staticmethod
    def _mark(conn: sqlite3.Connection, marks: list[tuple[str, str]]) -> None:
        now = to_micros(utcnow())
        for start in range(0, len(marks), ROWS_PER_STATEMENT):
            chunk = marks[start:start + ROWS_PER_STATEMENT]
            inserted = conn.execute(
                "INSERT INTO inbox (consumer, event_id, processed_at) VALUES "
                + ",".join(["(?, ?, ?)"] * len(chunk)) + " ON CONFLICT DO NOTHING",
                [v for consumer, event_id in chunk for v in (consumer, event_id, now)],
            ).rowcount
            if inserted != len(chunk):
                # Which one was processed already (or repeated within the job): say so.
                seen: set[tuple[str, str]] = set()
                for mark in chunk:
                    if mark in seen or conn.execute(
                        "SELECT processed_at != ? FROM inbox WHERE consumer = ? AND event_id = ?",
                        (now, *mark),
                    ).fetchone()[0]:
                        raise AlreadyProcessed(*mark)
                    seen.add(mark)
                raise AlreadyProcessed(*chunk[0])

    def _apply_in_order(
        self, conn: sqlite3.Connection, ops: Sequence[Operation]
    ) -> list[RecordedEvent]:
        """Operations one by one, in order (a job that clears or replaces a collection)."""
        recorded: list[RecordedEvent] = []
        for op in ops:
            if isinstance(op, PutDocument):
                sqlite_group.write_documents(conn, {(op.collection, op.key): op.body})
            elif isinstance(op, Append):
                recorded.extend(self._append(conn, op))
            elif isinstance(op, MarkProcessed):
                self._mark(conn, [(op.consumer, op.event_id)])
            elif isinstance(op, SetCheckpoint):
                self._set_checkpoint(conn, op)
            elif isinstance(op, DeleteDocument):
                sqlite_group.write_documents(conn, {(op.collection, op.key): None})
            elif isinstance(op, ClearCollection):
                conn.execute("DELETE FROM documents WHERE collection = ?", (op.collection,))
            elif isinstance(op, ReplaceCollection):
                conn.execute("DELETE FROM documents WHERE collection = ?", (op.target,))
                conn.execute(
                    "UPDATE documents SET collection = ? WHERE collection = ?",
                    (op.target, op.source),
                )
        return recorded

    @staticmethod
    def _set_checkpoint(conn: sqlite3.Connection, op: SetCheckpoint) -> None:
        """One statement in the usual cases: a conditional UPDATE (or a check alone when
        the value stays, as a projection's generation does); the row is read only to
        tell the actual value of a conflict."""
        if op.expected is None:
            conn.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (op.name, op.position),
            )
            return
        if op.expected == op.position:
            row = conn.execute(
                "SELECT position FROM checkpoints WHERE name = ?", (op.name,)
            ).fetchone()
            actual = int(row[0]) if row else 0
            if actual != op.expected:
                raise ConcurrencyError(f"checkpoint:{op.name}", op.expected, actual)
            return
        moved = conn.execute(
            "UPDATE checkpoints SET position = ? WHERE name = ? AND position = ?",
            (op.position, op.name, op.expected),
        ).rowcount == 1
        if not moved and op.expected == 0:
            moved = conn.execute(
                "INSERT INTO checkpoints (name, position) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (op.name, op.position),
            ).rowcount == 1
        if not moved:
            row = conn.execute(
                "SELECT position FROM checkpoints WHERE name = ?", (op.name,)
            ).fetchone()
            raise ConcurrencyError(f"checkpoint:{op.name}", op.expected,
                                   int(row[0]) if row else 0)

    def _append(self, conn: sqlite3.Connection, op: Append) -> list[RecordedEvent]:
        ids = [e.event_id for e in op.events]
        marks = ",".join("?" * len(ids))
        # One statement for both: is any id stored already, and the stream's version.
        stored, version = conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM events WHERE event_id IN ({marks})), "
            "(SELECT COALESCE(MAX(stream_version), 0) FROM events WHERE stream_id = ?)",
            [*ids, op.stream_id],
        ).fetchone()
        if stored:
            existing = conn.execute(
                f"{_SELECT_EVENTS} WHERE event_id IN ({marks}) ORDER BY global_position", ids
            ).fetchall()
            if len(existing) == len(set(ids)) and all(r[2] == op.stream_id for r in existing):
                return [_event(r) for r in existing]
            raise DuplicateEventError(
                f"append to {op.stream_id!r} mixes stored and new event ids"
            )
        version = int(version)
        if op.expected_version is not None and op.expected_version != version:
            raise ConcurrencyError(op.stream_id, op.expected_version, version)
        recorded = []
        for event in op.events:
            version += 1
            metadata, payload = dumps(event.metadata), dumps(event.payload)
            try:
                cur = conn.execute(
                    _INSERT_EVENT,
                    (
                        event.event_id, op.stream_id, version, event.type,
                        event.schema_version, to_micros(event.occurred_at),
                        event.correlation_id, event.causation_id, event.traceparent,
                        metadata, payload,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise DuplicateEventError(f"event id repeated in one batch: {exc}") from exc
            position = int(cur.lastrowid or 0)
            if self.outbox:
                conn.execute("INSERT INTO outbox (global_position) VALUES (?)", (position,))
            recorded.append(
                RecordedEvent(
                    event_id=event.event_id, type=event.type,
                    schema_version=event.schema_version, stream_id=op.stream_id,
                    stream_version=version, global_position=position,
                    occurred_at=event.occurred_at, correlation_id=event.correlation_id,
                    causation_id=event.causation_id, traceparent=event.traceparent,
                    metadata=orjson.loads(metadata), payload=orjson.loads(payload),
                )
            )
        self._inserted += recorded
        return recorded

    # -- reads --------------------------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        until: datetime | None = None,
    ) -> list[RecordedEvent]:
        sql = f"{_READ_EVENTS} WHERE stream_id = ? AND stream_version >= ?"
        params: list[Any] = [stream_id, from_version]
        if to_version is not None:
            sql += " AND stream_version <= ?"
            params.append(to_version)
        if until is not None:
            sql += " AND occurred_at <= ?"
            params.append(to_micros(until))
        return await self._read_events(sql + " ORDER BY stream_version", params)

    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self._read_events(
            f"{_READ_EVENTS} WHERE global_position > ? ORDER BY global_position LIMIT ?",
            (after, limit),
        )

    async def read_events(
        self, where: EventFilter, *, after: int = 0, limit: int = 100,
        before: int | None = None, descending: bool = False,
    ) -> list[RecordedEvent]:
        sql = f"{_READ_EVENTS} WHERE global_position > ?"
        params: list[Any] = [after]
        if before is not None:
            sql += " AND global_position < ?"
            params.append(before)
        if where.stream_id is not None:
            sql += " AND stream_id = ?"
            params.append(where.stream_id)
        if where.aggregates:
            # A prefix compared with substr, not LIKE: no wildcard in a name can match more.
            sql += " AND (" + " OR ".join(
                "substr(stream_id, 1, ?) = ?" for _ in where.aggregates) + ")"
            for aggregate in where.aggregates:
                params += [len(aggregate) + 1, f"{aggregate}-"]
        if where.types:
            sql += f" AND type IN ({','.join('?' * len(where.types))})"
            params += where.types
        if where.correlation_id is not None:
            sql += " AND correlation_id = ?"
            params.append(where.correlation_id)
        if where.since is not None:
            sql += " AND occurred_at >= ?"
            params.append(to_micros(where.since))
        if where.until is not None:
            sql += " AND occurred_at <= ?"
            params.append(to_micros(where.until))
        order = " DESC" if descending else ""
        return await self._read_events(
            sql + f" ORDER BY global_position{order} LIMIT ?", [*params, limit])

    async def read_event(self, event_id: str) -> RecordedEvent:
        events = await self._read_events(f"{_READ_EVENTS} WHERE event_id = ?", (event_id,))
        if not events:
            raise NotFound(f"no event {event_id}")
        return events[0]

    def known_version(self, stream_id: str) -> int | None:
        return self._known.version(stream_id)

    async def stream_version(self, stream_id: str) -> int:
        known = self._known.version(stream_id)
        if known is not None:
            return known
        rows = await self._read(
            "SELECT COALESCE(MAX(stream_version), 0) FROM events WHERE stream_id = ?",
            (stream_id,),
        )
        return int(rows[0][0])

    async def last_position(self) -> int:
        rows = await self._read("SELECT COALESCE(MAX(global_position), 0) FROM events")
        return int(rows[0][0])

    def known_head(self) -> int | None:
        return self._last_position if self._queue is not None else None

    def commit_signal(self) -> asyncio.Event | None:
        return self._new_events

    async def wait_for_events(self, after: int, timeout: float) -> None:
        if self._new_events is None or self._last_position > after:
            return
        waiter = self._new_events
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that lands as the event fires, and a cancelled subscription would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await waiter.wait()

    async def get_checkpoint(self, name: str) -> int:
        rows = await self._read("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        rows = await self._read(
            "SELECT 1 FROM inbox WHERE consumer = ? AND event_id = ?", (consumer, event_id)
        )
        return bool(rows)

    async def get_document(self, collection: str, key: str) -> JsonDict | None:
        known = self._known.document(collection, key)
        if known is not UNKNOWN:
            return None if known is None else orjson.loads(known)  # type: ignore[arg-type]
        rows = await self._read(
            "SELECT body FROM documents WHERE collection = ? AND key = ?", (collection, key)
        )
        return orjson.loads(rows[0][0]) if rows else None

    async def find_documents(
        self,
        collection: str,
        *,
        where: Mapping[str, str | int | bool] | None = None,
        after_key: str | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> list[tuple[str, JsonDict]]:
        sql = "SELECT key, body FROM documents WHERE collection = ?"
        params: list[Any] = [collection]
        for field_name, value in (where or {}).items():
            sql += " AND json_extract(body, ?) = json_extract(?, '$')"
            params += [f'$."{field_name}"', orjson.dumps(value).decode()]
        if after_key is not None:
            sql += " AND key < ?" if descending else " AND key > ?"
            params.append(after_key)
        order = " ORDER BY key DESC LIMIT ?" if descending else " ORDER BY key LIMIT ?"
        rows = await self._read(sql + order, [*params, limit])
        return [(r[0], orjson.loads(r[1])) for r in rows]

    # -- snapshots ----------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        def write() -> None:
            assert self._wconn is not None
            self._wconn.execute(
                "INSERT OR REPLACE INTO stream_snapshots (stream_id, version, schema_version, "
                "state, taken_at, event_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    snapshot.stream_id, snapshot.version, snapshot.schema_version,
                    dumps(snapshot.state), to_micros(snapshot.taken_at),
                    None if snapshot.event_at is None else to_micros(snapshot.event_at),
                ),
            )

        await self._in_writer(self._tracked, write)

    async def load_snapshot(
        self,
        stream_id: str,
        *,
        max_version: int | None = None,
        until: datetime | None = None,
    ) -> Snapshot | None:
        sql = (
            "SELECT version, schema_version, state, taken_at, event_at FROM stream_snapshots "
            "WHERE stream_id = ?"
        )
        params: list[Any] = [stream_id]
        if max_version is not None:
            sql += " AND version <= ?"
            params.append(max_version)
        if until is not None:
            sql += " AND event_at <= ?"
            params.append(to_micros(until))
        rows = await self._read(sql + " ORDER BY version DESC LIMIT 1", params)
        if not rows:
            return None
        version, schema_version, state, taken_at, event_at = rows[0]
        return Snapshot(stream_id, version, orjson.loads(state), schema_version,
                        from_micros(taken_at),
                        None if event_at is None else from_micros(event_at))

    async def read_latest(self, stream_id: str) -> tuple[Snapshot | None, list[RecordedEvent]]:
        conn = self._reader()
        try:
            with collector_paused():
                rows = conn.execute(_LOAD_LATEST, (stream_id,)).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc
        snapshot = None
        if rows and rows[0][0] == 0:
            _, version, schema_version, state, taken_at, event_at = rows.pop(0)[:6]
            snapshot = Snapshot(stream_id, version, orjson.loads(state), schema_version,
                                from_micros(taken_at),
                                None if event_at is None else from_micros(event_at))
        return snapshot, [StoredEvent(*row[1:]) for row in rows]

    # -- outbox -------------------------------------------------------------------------

    async def outbox_backlog(self, *, log: bool = False) -> int:
        rows = await self._read(f"SELECT COUNT(*) FROM {'outbox_log' if log else 'outbox'}")
        return int(rows[0][0])

    def outbox_batch(self, limit: int, *, log: bool = False,
                     read: LogReader | None = None) -> AbstractOutboxBatch:
        return _SqliteOutboxBatch(self, limit, log)  # its outbox is tables: `read` is moot


class _SqliteOutboxBatch(AbstractOutboxBatch):
    """Claims rows under an in-process lock (one per stage): a SQLite store has one relay
    process."""

    def __init__(self, store: SqliteEventStore, limit: int, log: bool) -> None:
        self._store = store
        self._limit = limit
        self._stage = "outbox_log" if log else "outbox"
        self._positions: list[int] = []

    def _lock(self) -> asyncio.Lock:
        locks = self._store._outbox_locks
        if locks is None:
            raise StorageError("the SQLite event store is not open")
        return locks[self._stage == "outbox_log"]

    async def __aenter__(self) -> list[RecordedEvent]:
        lock = self._lock()
        await lock.acquire()
        try:
            rows = await self._store._read(
                f"SELECT {', '.join('e.' + c for c in EVENT_COLUMNS.split(', '))} "
                f"FROM {self._stage} o JOIN events e ON e.global_position = o.global_position "
                "ORDER BY o.global_position LIMIT ?",
                (self._limit,),
            )
        except BaseException:
            lock.release()
            raise
        self._positions = [r[0] for r in rows]
        return [_event(r) for r in rows]

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        lock = self._lock()
        try:
            if exc_type is None and self._positions:
                positions = [(p,) for p in self._positions]
                stage = self._stage

                def delete() -> None:
                    conn = self._store._wconn
                    assert conn is not None
                    conn.execute("BEGIN IMMEDIATE")  # one commit, not one per row
                    try:
                        if stage == "outbox":  # published: on to the log stage
                            conn.executemany(
                                "INSERT INTO outbox_log (global_position) VALUES (?)", positions)
                        conn.executemany(
                            f"DELETE FROM {stage} WHERE global_position = ?", positions)
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise

                await self._store._in_writer(self._store._tracked, delete)
        finally:
            lock.release()
