"""PostgreSQL adapter of the event store (distributed mode): many processes share one database.

Gap-safe reading. Positions come from a sequence and transactions commit in any order, so a
reader can see position 12 committed while 11, allocated earlier by a transaction that is
still running, is not visible yet; moving past 11 would lose it for good. `read_all` thus
returns only the run of consecutive positions after `after` and stops at the first hole,
unless that hole is known to be permanent (its owner rolled back, or the sequence skipped
values). Knowing that relies on one invariant: an append gets its transaction id (it
writes to `streams`) before it calls nextval. The owner of a hole therefore held an id
before the position seen after the hole was allocated, so before the read that first saw
the hole. When a read sees the same hole again, the store draws a fresh transaction id N,
newer than any id that owner can hold. Once a read statement's snapshot has xmin >= N,
every transaction older than N has ended, and a position still missing from that very
snapshot will never appear: the reader passes it. (The xmax of the first snapshot is not a
safe bound: it is one past the newest *finished* transaction, and the owner may hold a
newer id than every finished one.) Writers are never serialised; a hole that is really a
rollback costs a reader three reads, and is passed only once no older transaction of the
cluster is running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from importlib.resources import files
from typing import Any, Final

import asyncpg
import orjson

from magasin.eventstore.rows import dumps
from magasin.eventstore.store import (
    AbstractOutboxBatch,
    Append,
    DeleteDocument,
    EventStore,
    MarkProcessed,
    Operation,
    PutDocument,
    SetCheckpoint,
    Snapshot,
)
from magasin.shared.errors import (
    AlreadyProcessed,
    ConcurrencyError,
    DuplicateEventError,
    NotFound,
    StorageError,
    Unavailable,
)
from magasin.shared.messages import JsonDict, RecordedEvent

_DDL: Final = files("magasin.eventstore").joinpath("sql/postgres.sql").read_text("utf-8")

# In RecordedEvent field order: a row converts with RecordedEvent(*row), the cheapest way.
_COLUMNS: Final = (
    "event_id, type, schema_version, stream_id, stream_version, global_position, "
    "occurred_at, correlation_id, causation_id, traceparent, metadata, payload"
)
_SELECT_EVENTS: Final = f"SELECT {_COLUMNS} FROM events"
_POSITION: Final = 5
_STREAM: Final = 3

# The snapshot's xmin comes from the statement that reads the rows: a hole may only be
# judged permanent against the very snapshot in which it is still missing.
_READ_ALL: Final = (
    f"SELECT {_COLUMNS}, s.xmin FROM events, "
    "(SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin OFFSET 0) AS s "
    "WHERE global_position > $1 ORDER BY global_position LIMIT $2"
)
_APPEND: Final = (
    "SELECT o_outcome, o_version, o_positions "
    "FROM magasin_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
_APPENDED, _IDS_STORED, _VERSION_MISMATCH = 0, 1, 2
_EVENT_ID_KEY: Final = "events_event_id_key"
_APPEND_ATTEMPTS: Final = 3
_CLAIM_OUTBOX: Final = (
    f"SELECT {', '.join('e.' + c for c in _COLUMNS.split(', '))} "
    "FROM outbox o JOIN events e ON e.global_position = o.global_position "
    "ORDER BY o.global_position LIMIT $1 FOR UPDATE OF o SKIP LOCKED"
)
_CONNECT_TIMEOUT: Final = 10.0

_UNREACHABLE: Final = (
    OSError,  # refused, reset, DNS, and TimeoutError
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)
_DRIVER_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@contextmanager
def _translated() -> Iterator[None]:
    """Turn driver errors into the magasin error tree; let every other exception through."""
    try:
        yield
    except _UNREACHABLE as exc:
        raise Unavailable(f"PostgreSQL is unreachable: {exc!r}") from exc
    except asyncpg.InterfaceError as exc:
        # asyncpg tells a closed pool or connection only by its message.
        if "closed" in str(exc) or "closing" in str(exc):
            raise Unavailable(f"PostgreSQL connection lost: {exc}") from exc
        raise StorageError(f"postgres: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise StorageError(f"postgres: {exc}") from exc


class _EventIdRace(Exception):
    """Another transaction committed one of the event ids while this one was inserting it."""


def _encode_json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: Any) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_encode_json, decoder=orjson.loads, schema="pg_catalog"
    )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresEventStore(EventStore):
    """Event store in one PostgreSQL schema; any number of processes may open the same one."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        outbox: bool = False,
        pool_min: int = 2,
        pool_max: int = 10,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.outbox = outbox
        self._pool_min = pool_min
        self._pool_max = pool_max
        # NOTIFY refuses channel names longer than an identifier (63 bytes).
        self._channel = f"magasin_events_{schema}".encode()[:63].decode(errors="ignore")
        self._pool: Any = None
        self._listener: Any = None
        self._notifier: asyncio.Task[None] | None = None
        self._notify_pending = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._head = 0
        # First missing position of a hole -> None when seen once, then the transaction id
        # a snapshot's xmin must reach before the hole counts as permanent.
        self._holes: dict[int, int | None] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        with _translated():
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                server_settings={"search_path": _quote_ident(self.schema)},
                init=_init_connection,
                timeout=_CONNECT_TIMEOUT,
            )
        try:
            with _translated():
                async with pool.acquire() as conn:
                    async with conn.transaction():
                        # Concurrent CREATE ... IF NOT EXISTS can still collide in the
                        # catalogs: processes opening the same schema take turns.
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtext($1))",
                            f"magasin-ddl:{self.schema}",
                        )
                        await conn.execute(
                            f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}"
                        )
                        await conn.execute(_DDL)
                    head = await conn.fetchval(
                        "SELECT coalesce(max(global_position), 0) FROM events"
                    )
                # Synchronous commit buys nothing for a NOTIFY-only transaction.
                listener = await asyncpg.connect(
                    self.dsn,
                    server_settings={"synchronous_commit": "off"},
                    timeout=_CONNECT_TIMEOUT,
                )
                await listener.add_listener(self._channel, self._on_notification)
        except BaseException:
            pool.terminate()
            raise
        self._pool, self._listener, self._head = pool, listener, int(head)
        self._notifier = asyncio.create_task(self._notify_loop(), name="postgres-notifier")

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, listener, notifier = self._pool, self._listener, self._notifier
        self._pool = self._listener = self._notifier = None
        self._advance(self._head)
        if notifier is not None:
            notifier.cancel()
            with suppress(asyncio.CancelledError):
                await notifier
        try:
            with suppress(*_DRIVER_ERRORS):
                await listener.close(timeout=_CONNECT_TIMEOUT)
        finally:
            with _translated():
                await pool.close()

    def _live_pool(self) -> Any:
        if self._pool is None:
            raise StorageError("the PostgreSQL event store is not open")
        return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        pool = self._live_pool()
        with _translated():
            async with pool.acquire() as conn:
                yield conn

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        pool = self._live_pool()
        with _translated():
            rows: list[Any] = await pool.fetch(sql, *args)
        return rows

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        pool = self._live_pool()
        with _translated():
            return await pool.fetchval(sql, *args)

    # -- writes -------------------------------------------------------------------------

    async def commit(self, operations: Sequence[Operation]) -> list[RecordedEvent]:
        for _ in range(_APPEND_ATTEMPTS):
            try:
                async with self._connection() as conn:
                    if len(operations) == 1 and isinstance(operations[0], Append):
                        # One statement is its own transaction: a single round trip.
                        recorded = await self._append(conn, operations[0])
                    else:
                        async with conn.transaction():
                            recorded = await self._apply(conn, operations)
            except _EventIdRace:
                # Everything was rolled back and the other transaction has committed: run
                # the unit again, and its append now finds the ids stored.
                continue
            if recorded:
                self._committed(max(e.global_position for e in recorded))
            return recorded
        raise DuplicateEventError("event ids kept colliding with concurrent appends")

    async def _apply(self, conn: Any, operations: Sequence[Operation]) -> list[RecordedEvent]:
        recorded: list[RecordedEvent] = []
        for op in operations:
            if isinstance(op, Append):
                recorded += await self._append(conn, op)
            elif isinstance(op, MarkProcessed):
                inserted = await conn.fetchval(
                    "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2) "
                    "ON CONFLICT DO NOTHING RETURNING true",
                    op.consumer,
                    op.event_id,
                )
                if not inserted:
                    raise AlreadyProcessed(op.consumer, op.event_id)
            elif isinstance(op, SetCheckpoint):
                await conn.execute(
                    "INSERT INTO checkpoints (name, position) VALUES ($1, $2) "
                    "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                    op.name,
                    op.position,
                )
            elif isinstance(op, PutDocument):
                await conn.execute(
                    "INSERT INTO documents (collection, key, body) VALUES ($1, $2, $3) "
                    "ON CONFLICT (collection, key) DO UPDATE SET body = excluded.body",
                    op.collection,
                    op.key,
                    op.body,
                )
            elif isinstance(op, DeleteDocument):
                await conn.execute(
                    "DELETE FROM documents WHERE collection = $1 AND key = $2",
                    op.collection,
                    op.key,
                )
        return recorded

    async def _append(self, conn: Any, op: Append) -> list[RecordedEvent]:
        """Append on `conn`, in whatever transaction it is in (see magasin_append)."""
        events = op.events
        ids = [e.event_id for e in events]
        if len(set(ids)) < len(ids):
            return await self._stored(conn, op, ids)
        metadata = [dumps(e.metadata) for e in events]
        payloads = [dumps(e.payload) for e in events]
        try:
            outcome, version, positions = await conn.fetchrow(
                _APPEND,
                op.stream_id,
                op.expected_version,
                ids,
                [e.type for e in events],
                [e.schema_version for e in events],
                [e.occurred_at for e in events],
                [e.correlation_id for e in events],
                [e.causation_id for e in events],
                [e.traceparent for e in events],
                metadata,
                payloads,
                self.outbox,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == _EVENT_ID_KEY:
                raise _EventIdRace from exc
            raise
        if outcome == _VERSION_MISMATCH:
            raise ConcurrencyError(op.stream_id, op.expected_version, version)
        if outcome == _IDS_STORED:
            return await self._stored(conn, op, ids)
        first = version - len(events)
        return [
            RecordedEvent(
                event_id=event.event_id,
                type=event.type,
                schema_version=event.schema_version,
                stream_id=op.stream_id,
                stream_version=first + i,
                global_position=position,
                occurred_at=event.occurred_at,
                correlation_id=event.correlation_id,
                causation_id=event.causation_id,
                traceparent=event.traceparent,
                metadata=orjson.loads(meta),
                payload=orjson.loads(payload),
            )
            for i, (event, position, meta, payload) in enumerate(
                zip(events, positions, metadata, payloads, strict=True), start=1
            )
        ]

    async def _stored(self, conn: Any, op: Append, ids: list[str]) -> list[RecordedEvent]:
        """The stored events of a retried append, or DuplicateEventError if it is not one."""
        rows = await conn.fetch(
            f"{_SELECT_EVENTS} WHERE event_id = ANY($1::text[]) ORDER BY global_position", ids
        )
        if len(rows) == len(set(ids)) and all(r[_STREAM] == op.stream_id for r in rows):
            return [RecordedEvent(*r) for r in rows]
        raise DuplicateEventError(
            f"append to {op.stream_id!r} mixes stored and new event ids, or repeats one"
        )

    # -- change notification --------------------------------------------------------------

    def _committed(self, position: int) -> None:
        self._advance(position)
        self._notify_pending.set()

    def _advance(self, position: int) -> None:
        self._head = max(self._head, position)
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _on_notification(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._advance(int(payload) if payload.isdigit() else 0)

    async def _notify_loop(self) -> None:
        """Tell other processes about commits, one NOTIFY at a time whatever the commit rate.

        Writers do not NOTIFY in their own transactions: PostgreSQL serialises the commits
        of notifying transactions, which would defeat group commit.
        """
        while True:
            await self._notify_pending.wait()
            self._notify_pending.clear()
            # Listeners that miss this wake up on their polling timeout instead.
            with suppress(*_DRIVER_ERRORS):
                await self._listener.execute(
                    "SELECT pg_notify($1, $2)", self._channel, str(self._head)
                )

    async def wait_for_events(self, after: int, timeout: float) -> None:  # noqa: ASYNC109 - the port's signature
        # Past a hole, "committed" is not "readable": wait for the next commit instead.
        if self._head > after and after + 1 not in self._holes:
            return
        waiter = self._wakeup
        with suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout)

    # -- reads --------------------------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int = 1,
        to_version: int | None = None,
        until: datetime | None = None,
    ) -> list[RecordedEvent]:
        sql = f"{_SELECT_EVENTS} WHERE stream_id = $1 AND stream_version >= $2"
        params: list[Any] = [stream_id, from_version]
        if to_version is not None:
            params.append(to_version)
            sql += f" AND stream_version <= ${len(params)}"
        if until is not None:
            params.append(until)
            sql += f" AND occurred_at <= ${len(params)}"
        rows = await self._fetch(sql + " ORDER BY stream_version", *params)
        return [RecordedEvent(*r) for r in rows]

    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        rows = await self._fetch(_READ_ALL, after, limit)
        events: list[RecordedEvent] = []
        expected = after + 1
        for row in rows:
            position = row[_POSITION]
            if position != expected and not await self._hole_is_permanent(expected, row[-1]):
                break
            events.append(RecordedEvent(*row[:-1]))
            expected = position + 1
        if self._holes and events:
            for hole in [p for p in self._holes if after < p < expected]:
                del self._holes[hole]
        return events

    async def _hole_is_permanent(self, position: int, xmin: int) -> bool:
        """Whether the hole starting at `position`, missing from a snapshot whose xmin is
        `xmin`, can never fill (see the module docstring)."""
        if position not in self._holes:
            self._holes[position] = None
            return False
        horizon = self._holes[position]
        if horizon is None:
            self._holes[position] = int(await self._fetchval("SELECT pg_current_xact_id()"))
            return False
        return xmin >= horizon

    async def read_event(self, event_id: str) -> RecordedEvent:
        rows = await self._fetch(f"{_SELECT_EVENTS} WHERE event_id = $1", event_id)
        if not rows:
            raise NotFound(f"no event {event_id}")
        return RecordedEvent(*rows[0])

    async def stream_version(self, stream_id: str) -> int:
        version = await self._fetchval(
            "SELECT version FROM streams WHERE stream_id = $1", stream_id
        )
        return int(version or 0)

    async def last_position(self) -> int:
        # Every committed position is reached by read_all in the end: holes below it are
        # either filled or passed once their owners are gone.
        return int(await self._fetchval("SELECT coalesce(max(global_position), 0) FROM events"))

    async def get_checkpoint(self, name: str) -> int:
        position = await self._fetchval("SELECT position FROM checkpoints WHERE name = $1", name)
        return int(position or 0)

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        found = await self._fetchval(
            "SELECT true FROM inbox WHERE consumer = $1 AND event_id = $2", consumer, event_id
        )
        return bool(found)

    async def get_document(self, collection: str, key: str) -> JsonDict | None:
        body: JsonDict | None = await self._fetchval(
            "SELECT body FROM documents WHERE collection = $1 AND key = $2", collection, key
        )
        return body

    async def find_documents(
        self,
        collection: str,
        *,
        where: Mapping[str, str | int | bool] | None = None,
        after_key: str | None = None,
        limit: int = 100,
    ) -> list[tuple[str, JsonDict]]:
        sql = "SELECT key, body FROM documents WHERE collection = $1"
        params: list[Any] = [collection]
        if where:
            params.append(dict(where))
            sql += f" AND body @> ${len(params)}::jsonb"
        if after_key is not None:
            params.append(after_key)
            sql += f" AND key > ${len(params)}"
        params.append(limit)
        rows = await self._fetch(f"{sql} ORDER BY key LIMIT ${len(params)}", *params)
        return [(r[0], r[1]) for r in rows]

    # -- snapshots ----------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._fetchval(
            "INSERT INTO snapshots (stream_id, version, schema_version, state, taken_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream_id) DO UPDATE SET "
            "version = excluded.version, schema_version = excluded.schema_version, "
            "state = excluded.state, taken_at = excluded.taken_at "
            "WHERE excluded.version >= snapshots.version",
            snapshot.stream_id,
            snapshot.version,
            snapshot.schema_version,
            snapshot.state,
            snapshot.taken_at,
        )

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        rows = await self._fetch(
            "SELECT version, state, schema_version, taken_at FROM snapshots "
            "WHERE stream_id = $1",
            stream_id,
        )
        if not rows:
            return None
        version, state, schema_version, taken_at = rows[0]
        return Snapshot(stream_id, version, state, schema_version, taken_at)

    # -- outbox -------------------------------------------------------------------------

    def outbox_batch(self, limit: int) -> AbstractOutboxBatch:
        return _PostgresOutboxBatch(self, limit)


class _PostgresOutboxBatch(AbstractOutboxBatch):
    """Claims outbox rows with FOR UPDATE SKIP LOCKED in a transaction held until the block
    exits, so relays in any number of processes claim disjoint batches."""

    def __init__(self, store: PostgresEventStore, limit: int) -> None:
        self._store = store
        self._limit = limit
        self._pool: Any = None
        self._conn: Any = None
        self._tx: Any = None
        self._positions: list[int] = []

    async def __aenter__(self) -> list[RecordedEvent]:
        pool = self._store._live_pool()
        with _translated():
            conn = await pool.acquire()
        try:
            with _translated():
                tx = conn.transaction()
                await tx.start()
                rows = await conn.fetch(_CLAIM_OUTBOX, self._limit)
        except BaseException:
            await _release(pool, conn)
            raise
        self._pool, self._conn, self._tx = pool, conn, tx
        self._positions = [r[_POSITION] for r in rows]
        return [RecordedEvent(*r) for r in rows]

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                with _translated():
                    if self._positions:
                        await self._conn.execute(
                            "DELETE FROM outbox WHERE global_position = ANY($1::bigint[])",
                            self._positions,
                        )
                    await self._tx.commit()
        finally:
            await _release(self._pool, self._conn)


async def _release(pool: Any, conn: Any) -> None:
    """Give a connection back; the pool rolls back a transaction left open (releasing the
    claimed rows), and closes a connection it cannot reset, which releases them too."""
    with suppress(*_DRIVER_ERRORS):
        await pool.release(conn)
