"""PostgreSQL adapter of the event store (distributed mode): many processes share one database.

Gap-safe reading. Positions come from a sequence and transactions commit in any order, so a
reader can see position 12 committed while 11, allocated earlier by a transaction that is
still running, is not visible yet; moving past 11 would lose it for good. `read_all` thus
returns only the run of consecutive positions after `after` and stops at the first hole,
unless that hole is known to be permanent (its owner rolled back, or the sequence skipped
values). Knowing that relies on one invariant: an append gets its transaction id (it
writes to `streams`) before it calls nextval. The owner of a hole therefore held an id
before the position seen after the hole was allocated, so before the read that first saw
the hole. Right after the read that first sees a hole, the store draws a fresh
transaction id N, newer than any id that owner can hold (and than the ids of the owners of
the other holes that read saw before one of its positions: they share N). Once a read
statement's snapshot has xmin >= N, every transaction older than N has ended, and a
position still missing from that very snapshot will never appear: the reader passes it.
(The xmax of the first snapshot is not a safe bound: it is one past the newest *finished*
transaction, and the owner may hold a newer id than every finished one.) Writers are never
serialised; a hole that is really a rollback costs a reader two reads, and is passed only
once no older transaction of the cluster is running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from importlib.resources import files
from itertools import accumulate, pairwise
from typing import Any, Final

import asyncpg
import orjson

from magasin.eventstore.connections import POOL_MAX_DEFAULT, refusal, server_limits, shortage
from magasin.eventstore.rows import StoredEvent, collector_paused, dumps
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
from magasin.shared.errors import (
    AlreadyProcessed,
    ConcurrencyError,
    ConfigurationError,
    Conflict,
    DuplicateEventError,
    MagasinError,
    NotFound,
    StorageError,
    Unavailable,
)
from magasin.shared.messages import JsonDict, RecordedEvent

_DDL: Final = files("magasin.eventstore").joinpath("sql/postgres.sql").read_text("utf-8")

# In StoredEvent's argument order: a row converts with StoredEvent(*row), the cheapest way.
# The JSON columns come as text, decoded only if a reader looks at them (see StoredEvent).
_COLUMNS: Final = (
    "event_id, type, schema_version, stream_id, stream_version, global_position, "
    "occurred_at, correlation_id, causation_id, traceparent, metadata::text, payload::text"
)
_SELECT_EVENTS: Final = f"SELECT {_COLUMNS} FROM events"
_POSITION: Final = 5
_HOLE_RECHECK_S: Final = 0.02
"""How soon a reader stopped at a hole reads again (see wait_for_events)."""
_STREAM: Final = 3

# The snapshot's xmin comes from the statement that reads the rows: a hole may only be
# judged permanent against the very snapshot in which it is still missing.
_READ_ALL: Final = (
    f"SELECT {_COLUMNS}, s.xmin FROM events, "
    "(SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin OFFSET 0) AS s "
    "WHERE global_position > $1 ORDER BY global_position LIMIT $2"
)
_READ_LATEST: Final = (
    "SELECT s.version, s.state, s.schema_version, s.taken_at, s.event_at, "
    + ", ".join("e." + c.split("::")[0] + ("::text" if "::" in c else "")
                for c in _COLUMNS.split(", "))
    + " FROM (SELECT 1) AS one "
    "LEFT JOIN LATERAL (SELECT version, state, schema_version, taken_at, event_at "
    "FROM stream_snapshots WHERE stream_id = $1 ORDER BY version DESC LIMIT 1) AS s ON true "
    "LEFT JOIN LATERAL (SELECT * FROM events WHERE stream_id = $1 "
    "AND stream_version > coalesce(s.version, 0)) AS e ON true "
    "ORDER BY e.stream_version"
)
_APPEND: Final = (
    "SELECT o_outcomes, o_versions, o_positions "
    "FROM magasin_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
_COMMIT: Final = (
    "SELECT o_outcomes, o_versions, o_positions FROM magasin_commit("
    + ", ".join(f"${i}" for i in range(1, 24)) + ")"
)
_IN_ONE_CALL: Final = (Append, MarkProcessed, SetCheckpoint, PutDocument, DeleteDocument,
                       ExpectVersion)
_APPENDED, _IDS_STORED, _VERSION_MISMATCH = 0, 1, 2
_EVENT_ID_KEY: Final = "events_event_id_key"
_ATTEMPTS: Final = 3
# Two committers let a group form and start while the previous one commits; more would
# split the groups, and bigger groups are what makes group commit pay.
_COMMITTERS: Final = 2
_GROUP_MAX: Final = 256


_PUBLISHED: Final = "outbox:publish"
_SHIPPED: Final = "outbox:ship"
"""The outbox's two positions in the log, as checkpoints (see outbox_batch)."""
# $1, $2: the positions published and shipped as the relaying process knows them (its last
# moves may not be saved yet), NULL elsewhere: the saved ones.
_OUTBOX_BACKLOG: Final = (
    "SELECT count(*) FROM events WHERE global_position > coalesce($1::bigint, "
    f"(SELECT position FROM checkpoints WHERE name = '{_PUBLISHED}'), 0)"
)
_OUTBOX_UNSHIPPED: Final = (
    "SELECT count(*) FROM events WHERE global_position > coalesce($2::bigint, "
    f"(SELECT position FROM checkpoints WHERE name = '{_SHIPPED}'), 0) "
    "AND global_position <= coalesce($1::bigint, "
    f"(SELECT position FROM checkpoints WHERE name = '{_PUBLISHED}'), 0)"
)
_LEASE_RETRY_S: Final = 1.0
"""How often a process that does not relay tries to take the lease (see outbox_batch)."""
_SAVE_EVERY_S: Final = 1.0
"""How long a publish may leave the position published unsaved (a shipping saves both)."""
log = logging.getLogger("magasin.eventstore.postgres")
_CONNECT_TIMEOUT: Final = 10.0
_NOTIFY_INTERVAL: Final = 0.005
_NOTIFY_RETRY_MAX_S: Final = 1.0
"""Longest wait before a NOTIFY that failed is tried again (the listener reconnecting)."""
_HELLO: Final = "hello"
"""A process's first NOTIFY: the others answer _HERE, so each knows the others exist."""
_HERE: Final = "here"
_BYE: Final = "bye"
"""A process's last NOTIFY, as its store closes: the others stop notifying it."""
_PEERS_CHECK_S: Final = 30.0
"""How often a process that notifies its commits checks that its peers still live (one
that died said no _BYE)."""

# Plans that use the indexes whatever the statistics. Every statement of the store reads
# by a key or a key prefix (each table's primary or unique key, events_correlation), so an
# index is the right plan except on a table of a page or two, where it costs a page more.
# The planner cannot be trusted to know that: a server without autovacuum never gathers
# statistics on a new schema, and a plan cached while a table was small (asyncpg's
# prepared statements, PL/pgSQL's in magasin_append and magasin_commit) is kept for the
# session's life, however large the table grows. That is how each append came to read the
# whole log (issue 10: 27,256 sequential scans, 1.5 billion rows read for 69,500 events).
# Generic plans, always: a statement is planned once per session rather than at each of
# its first five runs and then again whenever PostgreSQL judges a custom plan cheaper,
# which for the commit function's statements it did at every call (planning was 12% of
# the backends' CPU in a saga benchmark; a fifth of their CPU a sale went with it).
_SESSION_SETTINGS: Final = {"enable_seqscan": "off", "plan_cache_mode": "force_generic_plan"}
_ANALYZE_CHECK_EVERY: Final = 5000
"""Rows a store writes (events, documents, marks) between two looks for tables whose
statistics are stale (see _analyze_stale)."""
# Stale: never analyzed, or changed by more rows (plus 50) than it held when last analyzed.
# Autovacuum's default is a tenth of that, for plans that follow the statistics; the
# store's plans do not (above), so its statistics only need the tables' sizes roughly
# right, and a growing table is analyzed a logarithmic number of times, not at each tenth.
# Tables of the session's schema only (its search_path).
_STALE_TABLES: Final = """
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE n.nspname = current_schema() AND c.relkind = 'r'
  AND (coalesce(s.last_analyze, s.last_autoanalyze) IS NULL
       OR s.n_mod_since_analyze > 50 + greatest(c.reltuples, 0))
ORDER BY c.relname
"""

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
    except asyncpg.exceptions.InternalClientError as exc:
        # What asyncpg raises when a connection breaks in the middle of a protocol
        # exchange (a server restart, say): the next attempt on a new connection works.
        raise Unavailable(f"PostgreSQL connection broke: {exc!r}") from exc


class _Retry(Exception):
    """The database aborted a transaction over a race that running it again resolves."""


@contextmanager
def _races_retried() -> Iterator[None]:
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        # Another transaction committed one of the event ids while this one inserted it:
        # run again, the append then finds the id stored.
        if exc.constraint_name != _EVENT_ID_KEY:
            raise
        raise _Retry from exc
    except asyncpg.exceptions.DeadlockDetectedError as exc:
        raise _Retry from exc


def _in_one_call(op: Operation) -> bool:
    """Whether magasin_commit can apply `op`; others go through the statement path."""
    if isinstance(op, Append):
        return not _repeats_an_id(op)
    return isinstance(op, _IN_ONE_CALL)


class _IdsStored(Exception):
    """magasin_commit met an append whose ids are stored already (a retry, or a clash)."""


def _refusal(appends: Sequence[Append], detail: str) -> Exception:
    """The error for magasin_commit's MG002: `outcomes;versions`, one per append."""
    outcomes, _, versions = detail.partition(";")
    for op, outcome, version in zip(appends, outcomes.split(","), versions.split(","),
                                    strict=True):
        if int(outcome) == _IDS_STORED:
            return _IdsStored()
        if int(outcome) == _VERSION_MISMATCH:
            return ConcurrencyError(op.stream_id, op.expected_version, int(version))
    return StorageError(f"magasin_commit refused an append without a reason: {detail}")


Outcome = list[RecordedEvent] | MagasinError
"""What committing one unit came to: its recorded events, or why it was refused."""


def _repeats_an_id(op: Append) -> bool:
    return len({e.event_id for e in op.events}) < len(op.events)


def _encode_json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: Any) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=_encode_json, decoder=orjson.loads, schema="pg_catalog"
    )


async def _keep_session(conn: Any) -> None:
    """Pool reset hook: the store never changes session state (no SET, LISTEN, session
    locks or cursors), so skip the reset query, a round trip on every release."""


def _recorded(
    op: Append, version: int, positions: Sequence[int], metadata: list[str], payloads: list[str]
) -> list[RecordedEvent]:
    """The envelopes of a unit just appended; the stream is at `version` after it."""
    first = version - len(op.events)
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
            zip(op.events, positions, metadata, payloads, strict=True), start=1
        )
    ]


async def _analyze_stale(conn: Any) -> list[str]:
    """ANALYZE the tables of the connection's schema whose statistics are missing or stale
    (autovacuum's default rule); returns their names. Quick on a new schema (empty tables);
    on a large table ANALYZE reads a sample of 30,000 rows whatever its size."""
    tables: list[str] = [r[0] for r in await conn.fetch(_STALE_TABLES)]
    for table in tables:
        await conn.execute(f"ANALYZE {_quote_ident(table)}")
    return tables


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresEventStore(EventStore):
    """Event store in one PostgreSQL schema; any number of processes may open the same one.

    Units of work that are a single append are group-committed: those queued while a group
    is being committed go together, in one statement and one transaction, in the next
    group. Other units of work commit in a transaction of their own.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        outbox: bool = False,
        pool_min: int = 2,
        pool_max: int = POOL_MAX_DEFAULT,
        cluster_processes: int = 1,
    ) -> None:
        """`pool_max` bounds the pool; the store holds one connection more, its listener.
        `cluster_processes`: the processes, this one included, that the server must serve
        at `pool_max + 1` connections each; open() refuses when max_connections cannot
        (see magasin.eventstore.connections)."""
        self.dsn = dsn
        self.schema = schema
        self.outbox = outbox
        self._pool_min = min(pool_min, pool_max)
        self._pool_max = pool_max
        self._cluster_processes = cluster_processes
        # Shown in pg_stat_activity: which process of which schema holds a connection.
        self._application = f"magasin:{schema}:{os.getpid()}"[:63]
        # NOTIFY refuses channel names longer than an identifier (63 bytes).
        self._channel = f"magasin_events_{schema}".encode()[:63].decode(errors="ignore")
        self._pool: Any = None
        self._listener: Any = None
        self._notifier: asyncio.Task[None] | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._notify_pending = asyncio.Event()
        """Set when there is something to NOTIFY (see _notify_loop)."""
        self._to_say: list[str] = []
        """Greetings not sent yet (_HELLO, _HERE), in order."""
        self._untold = False
        """Whether a commit of this process is not notified yet."""
        self._peers: set[int] = set()
        """Listener pids of the other processes of this schema: commits are notified only
        while there is one (a process alone, the common deployment, has nobody to tell:
        that was a statement per commit). A peer leaves it when it says _BYE, or when a
        check finds its session gone (it died): once a CLI command that opened the store
        had ended, every commit of a service used to be notified for good."""
        self._peers_checked = time.monotonic()
        self._queue: list[tuple[Append, asyncio.Future[list[RecordedEvent]]]] = []
        self._queued = asyncio.Event()
        self._committers: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._head = 0
        # First missing position of a hole -> the transaction id a snapshot's xmin must
        # reach before the hole counts as permanent (drawn when the hole is first seen).
        self._holes: dict[int, int | None] = {}
        self._written = 0  # rows written since the last look for stale statistics
        self._analyzer: asyncio.Task[None] | None = None
        self._listener_lock = asyncio.Lock()
        """asyncpg runs one operation at a time on a connection: the NOTIFYs and the
        outbox's lease take turns on the listener."""
        self._lease: Any = None
        """The listener connection on which this process holds the outbox's lease."""
        self._outbox_at = [0, 0]
        """While the lease is held: the positions published and shipped (see outbox_batch)."""
        self._lease_tried = -_LEASE_RETRY_S
        self._outbox_saved = [0, 0]
        """The positions last saved (the relay moves them in memory first)."""
        self._saved_at = -_SAVE_EVERY_S
        self._outbox_locks = (asyncio.Lock(), asyncio.Lock())
        self._checkpoints = f"{_quote_ident(schema)}.checkpoints"  # the listener has no search_path

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        with _translated():
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                server_settings={"search_path": _quote_ident(self.schema),
                                 "application_name": self._application,
                                 **_SESSION_SETTINGS},
                init=_init_connection,
                reset=_keep_session,
                timeout=_CONNECT_TIMEOUT,
            )
        listener = None
        try:
            with _translated():
                async with pool.acquire() as conn:
                    await self._check_budget(conn, pool.get_size())
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
                        # A new or migrated schema gets its statistics now, not from an
                        # autovacuum the server may not run.
                        await _analyze_stale(conn)
                    head = await conn.fetchval(
                        "SELECT coalesce(max(global_position), 0) FROM events"
                    )
                listener = await self._connect_listener()
                await listener.add_listener(self._channel, self._on_notification)
                listener.add_termination_listener(self._listener_lost)
        except BaseException:
            if listener is not None:
                listener.terminate()
            pool.terminate()
            raise
        self._pool, self._listener, self._head = pool, listener, int(head)
        self._greet(_HELLO)  # now that this process listens: the others answer _HERE
        self._notifier = asyncio.create_task(self._notify_loop(), name="postgres-notifier")
        self._committers = [
            asyncio.create_task(self._commit_groups(), name=f"postgres-committer-{i}")
            for i in range(_COMMITTERS)
        ]

    async def _check_budget(self, conn: Any, own: int) -> None:
        """Refuse to open when the server cannot serve the configured cluster; warn when
        the connections other clients hold leave too few for this process now."""
        limits = await server_limits(conn)
        reason = refusal(self._cluster_processes, self._pool_max, limits)
        if reason is not None:
            raise ConfigurationError(reason)
        if (warning := shortage(own, self._pool_max, limits)) is not None:
            log.warning("%s (schema %s)", warning, self.schema)

    async def _connect_listener(self) -> Any:
        # Synchronous commit buys nothing for a NOTIFY-only transaction.
        return await asyncpg.connect(
            self.dsn,
            server_settings={"synchronous_commit": "off", "application_name": self._application},
            timeout=_CONNECT_TIMEOUT,
        )

    async def close(self) -> None:
        if self._pool is None:
            return
        if self.relays_outbox:
            with suppress(MagasinError):  # else the next relay publishes them again
                await self._outbox_save(self._lease)
        if self._peers and self._listener is not None:
            with suppress(*_DRIVER_ERRORS, TimeoutError):
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    await self._notify(_BYE)
        pool, listener, notifier = self._pool, self._listener, self._notifier
        self._pool = self._listener = self._notifier = None
        self._to_say.clear()
        if self._analyzer is not None:
            self._analyzer.cancel()
            with suppress(asyncio.CancelledError):
                await self._analyzer
            self._analyzer = None
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        self._advance(self._head)  # waiters return now rather than at their timeout
        tasks = [*self._committers, *([notifier] if notifier else [])]
        self._committers = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, future in self._queue:
            if not future.done():
                future.set_exception(StorageError("the PostgreSQL event store was closed"))
        self._queue.clear()
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
        op = operations[0] if len(operations) == 1 else None
        if isinstance(op, Append) and not _repeats_an_id(op):
            recorded = await self._grouped(op)
        else:
            recorded = await self._commit_alone(operations)
        if recorded:
            self._committed(max(e.global_position for e in recorded))
        self._wrote(len(recorded) + sum(not isinstance(o, Append) for o in operations))
        return recorded

    def _wrote(self, rows: int) -> None:
        """Count rows written; every _ANALYZE_CHECK_EVERY of them, refresh stale statistics
        in the background (a large load: an import, a replay, the archive catching up)."""
        self._written += rows
        if self._written < _ANALYZE_CHECK_EVERY or self._analyzer is not None:
            return
        self._written = 0
        self._analyzer = asyncio.get_running_loop().create_task(
            self._refresh_statistics(), name="postgres-analyze"
        )

    async def _refresh_statistics(self) -> None:
        try:
            async with self._connection() as conn, conn.transaction():
                # One analyzer per schema at a time, across processes: the others skip.
                if await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))",
                                       f"magasin-analyze:{self.schema}"):
                    await _analyze_stale(conn)
        except (MagasinError, *_DRIVER_ERRORS) as exc:
            log.warning("refreshing the statistics of schema %s failed: %r", self.schema, exc)
        finally:
            self._analyzer = None

    async def _grouped(self, op: Append) -> list[RecordedEvent]:
        self._live_pool()  # refuse now rather than queue for a closed store
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        self._queued.set()
        return await future

    async def _commit_groups(self) -> None:
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            group = self._queue[:_GROUP_MAX]
            del self._queue[:_GROUP_MAX]
            # Groups lock streams in one order, so that two of them cannot deadlock.
            group.sort(key=lambda unit: unit[0].stream_id)
            outcomes: Sequence[Outcome | Exception]
            try:
                outcomes = await self._commit_group([op for op, _ in group])
            except Exception as exc:
                outcomes = [exc] * len(group)
            except BaseException:
                for _, future in group:
                    if not future.done():
                        future.set_exception(StorageError("the PostgreSQL event store was closed"))
                raise
            self._saw(sorted((e for o in outcomes if isinstance(o, list) for e in o),
                             key=lambda e: e.global_position))
            for (_, future), outcome in zip(group, outcomes, strict=True):
                if future.done():
                    continue  # its writer was cancelled
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _commit_group(self, ops: list[Append]) -> list[Outcome]:
        try:
            async with self._connection() as conn:
                with _races_retried():
                    # One statement is its own transaction: a single round trip.
                    return await self._append_units(conn, ops)
        except _Retry:
            pass
        except StorageError:
            if len(ops) == 1:
                raise
        # The group was rolled back whole: commit its units one by one, so that a race or a
        # unit the database refuses (an invalid payload, say) affects none of the others.
        outcomes: list[Outcome] = []
        for op in ops:
            try:
                outcomes.append(await self._commit_alone([op]))
            except (Conflict, StorageError) as exc:
                outcomes.append(exc)
        return outcomes

    async def _commit_alone(self, operations: Sequence[Operation]) -> list[RecordedEvent]:
        """Commit one unit of work in a transaction of its own, again after a race."""
        for _ in range(_ATTEMPTS):
            try:
                recorded = await self._commit_once(operations)
                self._saw(recorded)
                return recorded
            except _Retry as exc:
                race = exc
        raise StorageError("the unit of work kept racing concurrent transactions") from race

    async def _commit_once(self, operations: Sequence[Operation]) -> list[RecordedEvent]:
        if all(_in_one_call(op) for op in operations):
            try:
                async with self._connection() as conn:
                    with _races_retried():
                        recorded = await self._commit_in_one_call(conn, operations)
                        self._saw(recorded)  # now, not after the connection's release
                        return recorded
            except _IdsStored:
                pass  # an idempotent retry among the appends: the statement path sorts it out
        async with self._connection() as conn:
            with _races_retried():
                async with conn.transaction():
                    return await self._apply(conn, operations)

    async def _commit_in_one_call(
        self, conn: Any, operations: Sequence[Operation]
    ) -> list[RecordedEvent]:
        """The unit of work as one magasin_commit call: one round trip instead of one per
        operation plus BEGIN and COMMIT, which is most of a consumer's database time."""
        appends = [op for op in operations if isinstance(op, Append)]
        marks = [op for op in operations if isinstance(op, MarkProcessed)]
        checkpoints = [op for op in operations if isinstance(op, SetCheckpoint)]
        docs = [op for op in operations if isinstance(op, PutDocument | DeleteDocument)]
        checks = [op for op in operations if isinstance(op, ExpectVersion)]
        events = [e for op in appends for e in op.events]
        metadata = [dumps(e.metadata) for e in events]
        payloads = [dumps(e.payload) for e in events]
        arguments = (
            [m.consumer for m in marks], [m.event_id for m in marks],
            list(accumulate(len(op.events) for op in appends)),
            [op.stream_id for op in appends], [op.expected_version for op in appends],
            [e.event_id for e in events], [e.type for e in events],
            [e.schema_version for e in events], [e.occurred_at for e in events],
            [e.correlation_id for e in events], [e.causation_id for e in events],
            [e.traceparent for e in events], metadata, payloads,
            [c.name for c in checkpoints], [c.position for c in checkpoints],
            [c.expected for c in checkpoints],
            [d.collection for d in docs], [d.key for d in docs],
            [dumps(d.body) if isinstance(d, PutDocument) else None for d in docs],
            [c.stream_id for c in checks], [c.version for c in checks],
            [c.before for c in checks],
        )
        try:
            # An empty array goes as NULL (the function reads both as none): asyncpg encodes
            # a NULL for nothing, an empty array with its header and element type, and most
            # of the 23 are empty in a unit (155 -> 131 us of client CPU a call, measured).
            _, versions, positions = await conn.fetchrow(
                _COMMIT, *(values or None for values in arguments))
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == "MG001":
                mark = marks[int(exc.detail) - 1]
                raise AlreadyProcessed(mark.consumer, mark.event_id) from exc
            if exc.sqlstate == "MG002":
                raise _refusal(appends, exc.detail) from exc
            if exc.sqlstate == "MG004":
                index, _, actual = exc.detail.partition(";")
                check = checks[int(index) - 1]
                raise ConcurrencyError(check.stream_id, check.version, int(actual)) from exc
            if exc.sqlstate == "MG003":
                index, _, actual = exc.detail.partition(";")
                moved = checkpoints[int(index) - 1]
                raise ConcurrencyError(
                    f"checkpoint:{moved.name}", moved.expected, int(actual)
                ) from exc
            raise
        recorded: list[RecordedEvent] = []
        first = 0
        for op, version in zip(appends, versions, strict=True):
            n = len(op.events)
            recorded += _recorded(op, version, positions[first : first + n],
                                  metadata[first : first + n], payloads[first : first + n])
            first += n
        return recorded

    async def _apply(self, conn: Any, operations: Sequence[Operation]) -> list[RecordedEvent]:
        recorded: list[RecordedEvent] = []
        puts: list[tuple[str, str, Any]] = []
        # Checked against the versions before this unit's appends, as magasin_commit does.
        for op in operations:
            if isinstance(op, ExpectVersion):
                actual = int(await conn.fetchval(
                    "SELECT coalesce((SELECT version FROM streams WHERE stream_id = $1), 0)",
                    op.stream_id) or 0)
                if actual != op.version and (
                        op.before is None or actual < op.version or await conn.fetchval(
                            "SELECT count(*) > 0 FROM events WHERE stream_id = $1 AND "
                            "stream_version > $2 AND global_position <= $3",
                            op.stream_id, op.version, op.before)):
                    raise ConcurrencyError(op.stream_id, op.version, actual)
        for index, op in enumerate(operations):
            if isinstance(op, PutDocument):
                # A run of puts (a projection's batch) goes in one pipelined round trip.
                puts.append((op.collection, op.key, op.body))
                following = operations[index + 1] if index + 1 < len(operations) else None
                if not isinstance(following, PutDocument):
                    await conn.executemany(
                        "INSERT INTO documents (collection, key, body) VALUES ($1, $2, $3) "
                        "ON CONFLICT (collection, key) DO UPDATE SET body = excluded.body",
                        puts,
                    )
                    puts = []
            elif isinstance(op, Append):
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
                if op.expected is not None:
                    # The row exists and is locked before it is compared, so two conditional
                    # writers of one checkpoint are serialised and the second one fails.
                    await conn.execute(
                        "INSERT INTO checkpoints (name, position) VALUES ($1, 0) "
                        "ON CONFLICT DO NOTHING",
                        op.name,
                    )
                    actual = await conn.fetchval(
                        "SELECT position FROM checkpoints WHERE name = $1 FOR UPDATE", op.name
                    )
                    if actual != op.expected:
                        raise ConcurrencyError(f"checkpoint:{op.name}", op.expected, actual)
                await conn.execute(
                    "INSERT INTO checkpoints (name, position) VALUES ($1, $2) "
                    "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                    op.name,
                    op.position,
                )
            elif isinstance(op, DeleteDocument):
                await conn.execute(
                    "DELETE FROM documents WHERE collection = $1 AND key = $2",
                    op.collection,
                    op.key,
                )
            elif isinstance(op, ClearCollection):
                await conn.execute("DELETE FROM documents WHERE collection = $1", op.collection)
            elif isinstance(op, ReplaceCollection):
                await conn.execute("DELETE FROM documents WHERE collection = $1", op.target)
                await conn.execute(
                    "UPDATE documents SET collection = $1 WHERE collection = $2",
                    op.target,
                    op.source,
                )
        return recorded

    async def _append(self, conn: Any, op: Append) -> list[RecordedEvent]:
        """Append one unit on `conn`, in whatever transaction it is in."""
        if _repeats_an_id(op):
            return await self._stored(conn, op)
        (outcome,) = await self._append_units(conn, [op])
        if isinstance(outcome, MagasinError):
            raise outcome
        return outcome

    async def _append_units(self, conn: Any, ops: Sequence[Append]) -> list[Outcome]:
        """Append units, none repeating an id, in one statement (see magasin_append)."""
        events = [e for op in ops for e in op.events]
        metadata = [dumps(e.metadata) for e in events]
        payloads = [dumps(e.payload) for e in events]
        outcomes, versions, positions = await conn.fetchrow(
            _APPEND,
            list(accumulate(len(op.events) for op in ops)),
            [op.stream_id for op in ops],
            [op.expected_version for op in ops],
            [e.event_id for e in events],
            [e.type for e in events],
            [e.schema_version for e in events],
            [e.occurred_at for e in events],
            [e.correlation_id for e in events],
            [e.causation_id for e in events],
            [e.traceparent for e in events],
            metadata,
            payloads,
        )
        results: list[Outcome] = []
        first = placed = 0  # the unit's first event; positions handed out so far
        for op, outcome, version in zip(ops, outcomes, versions, strict=True):
            n = len(op.events)
            if outcome == _APPENDED:
                results.append(
                    _recorded(
                        op,
                        version,
                        positions[placed : placed + n],
                        metadata[first : first + n],
                        payloads[first : first + n],
                    )
                )
                placed += n
            elif outcome == _VERSION_MISMATCH:
                results.append(ConcurrencyError(op.stream_id, op.expected_version, version))
            else:
                try:
                    results.append(await self._stored(conn, op))
                except DuplicateEventError as exc:
                    results.append(exc)
            first += n
        return results

    async def _stored(self, conn: Any, op: Append) -> list[RecordedEvent]:
        """The stored events of a retried append, or DuplicateEventError if it is not one."""
        ids = [e.event_id for e in op.events]
        rows = await conn.fetch(
            f"{_SELECT_EVENTS} WHERE event_id = ANY($1::text[]) ORDER BY global_position", ids
        )
        if len(rows) == len(set(ids)) and all(r[_STREAM] == op.stream_id for r in rows):
            return [StoredEvent(*r) for r in rows]
        raise DuplicateEventError(
            f"append to {op.stream_id!r} mixes stored and new event ids, or repeats one"
        )

    # -- statistics ---------------------------------------------------------------------

    # -- change notification --------------------------------------------------------------

    def _committed(self, position: int) -> None:
        self._advance(position)
        self._untold = True
        self._notify_pending.set()

    def _greet(self, what: str) -> None:
        """Have _notify_loop say `what` (once, however often asked before it is said)."""
        if what not in self._to_say:
            self._to_say.append(what)
        self._notify_pending.set()

    def _advance(self, position: int) -> None:
        self._head = max(self._head, position)
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _listener_lost(self, conn: object) -> None:
        """The LISTEN connection died (a server restart, say): the pool reconnects by
        itself, this one does not, and without it other processes' commits wake nobody."""
        if self._pool is None or self._relisten is not None:
            return  # closing, or reconnecting already
        log.warning("PostgreSQL change listener of schema %s lost; reconnecting", self.schema)
        self._relisten = asyncio.get_running_loop().create_task(
            self._listen_again(), name="postgres-relisten"
        )

    async def _listen_again(self) -> None:
        delay = 0.1
        while self._pool is not None:
            try:
                listener = await self._connect_listener()
                await listener.add_listener(self._channel, self._on_notification)
                listener.add_termination_listener(self._listener_lost)
            except (*_DRIVER_ERRORS, TimeoutError) as exc:
                log.warning("cannot reconnect the PostgreSQL change listener (%r); "
                            "retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._listener, self._relisten = listener, None
            # Processes that started meanwhile greeted nobody here: greet them again.
            self._greet(_HELLO)
            log.warning("PostgreSQL change listener of schema %s reconnected", self.schema)
            self._advance(self._head)  # readers may have missed notifications meanwhile
            return

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if pid == conn.get_server_pid():
            return  # this process's own NOTIFY: its commits woke the waiters already
        if payload == _BYE:
            self._peers.discard(pid)
            return
        self._peers.add(pid)
        if payload == _HELLO:  # a process starts: it must learn of this one too
            self._greet(_HERE)
            return
        if payload.isdigit():
            self._advance(int(payload))

    async def _notify_loop(self) -> None:
        """Say the greetings, and tell other processes about commits, at most one NOTIFY of
        commits per interval.

        The NOTIFYs go through this task, in order, and take turns on the listener
        connection with the outbox's lease (_listener_lock): asyncpg runs one operation at a
        time on a connection and refuses a second one meanwhile, so an answer to a greeting
        sent beside a commit's NOTIFY lost one of the two (a newcomer then never learnt of
        this process, or missed that commit). What fails is tried again, so no greeting is
        lost while the connection lives (a new connection greets anew, see _listen_again).

        Writers do not NOTIFY in their own transactions: PostgreSQL serialises the commits
        of notifying transactions, which would defeat group commit. And each NOTIFY is a
        transaction that signals every listening process, hence the interval.
        """
        failures = 0
        while True:
            await self._notify_pending.wait()
            self._notify_pending.clear()
            try:
                while self._to_say:
                    await self._notify(self._to_say[0])
                    self._to_say.pop(0)
                if (self._untold and self._peers
                        and time.monotonic() - self._peers_checked >= _PEERS_CHECK_S):
                    await self._forget_dead_peers()
                if self._untold and not self._peers:
                    self._untold = False  # nobody else listens on this schema
                if self._untold:
                    self._untold = False
                    try:
                        await self._notify(str(self._head))
                    except BaseException:
                        self._untold = True
                        raise
            except _DRIVER_ERRORS as exc:
                # The listener is broken (reconnecting, see _listener_lost): try again.
                failures += 1
                delay = min(_NOTIFY_INTERVAL * 2**failures, _NOTIFY_RETRY_MAX_S)
                log.debug("NOTIFY on schema %s failed (%r); again in %.3fs",
                          self.schema, exc, delay)
                self._notify_pending.set()
                await asyncio.sleep(delay)
                continue
            failures = 0
            await asyncio.sleep(_NOTIFY_INTERVAL)

    async def _forget_dead_peers(self) -> None:
        """Drop the peers whose sessions ended without a _BYE (their processes died)."""
        listener = self._listener
        if listener is None:
            return
        checked = set(self._peers)
        async with self._listener_lock:
            alive = await listener.fetchval(
                "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity "
                "WHERE pid = ANY($1::integer[])", list(checked))
        self._peers -= checked - set(alive)  # not one that greeted meanwhile
        self._peers_checked = time.monotonic()

    async def _notify(self, payload: str) -> None:
        listener = self._listener
        if listener is not None:  # None: the store is closing
            async with self._listener_lock:
                await listener.execute("SELECT pg_notify($1, $2)", self._channel, payload)

    def commit_signal(self) -> asyncio.Event | None:
        return self._wakeup

    def known_head(self) -> int | None:
        # Exact for this process's commits; another process's are known once its NOTIFY
        # arrives (at most _NOTIFY_INTERVAL after its commit, plus the trip).
        return self._head

    async def wait_for_events(self, after: int, timeout: float) -> None:
        # Past a hole, "committed" is not "readable": wait for the next commit instead.
        if self._head > after and after + 1 not in self._holes:
            return
        if after + 1 in self._holes:
            # Only another read can tell a rolled-back hole (passed on the third read) from
            # a late commit: once the writes stop, waiting the whole timeout for a commit
            # that may never come made a reader crawl at one hole per timeout.
            timeout = min(timeout, _HOLE_RECHECK_S)
        waiter = self._wakeup
        with suppress(TimeoutError):  # not wait_for: see SqliteEventStore.wait_for_events
            async with asyncio.timeout(timeout):
                await waiter.wait()

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
        with collector_paused():
            return [StoredEvent(*r) for r in rows]

    async def read_latest(self, stream_id: str) -> tuple[Snapshot | None, list[RecordedEvent]]:
        # One row per event after the snapshot (at least one row: the snapshot's columns
        # on every row, NULL without one; the event's NULL without events).
        rows = await self._fetch(_READ_LATEST, stream_id)
        first = rows[0]
        snapshot = None
        if first[0] is not None:
            snapshot = Snapshot(stream_id, first[0], first[1], first[2], first[3], first[4])
        with collector_paused():
            return snapshot, [StoredEvent(*r[5:]) for r in rows if r[5] is not None]

    async def read_all(self, *, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        rows = await self._fetch(_READ_ALL, after, limit)
        events: list[RecordedEvent]
        if rows and rows[-1][_POSITION] - after == len(rows):
            # Positions are distinct and ascending: n rows ending at after + n leave no hole.
            with collector_paused():
                events = [StoredEvent(*row[:-1]) for row in rows]
            expected = rows[-1][_POSITION] + 1
        else:
            events, expected = await self._up_to_a_hole(rows, after)
        if self._holes and events:
            for hole in [p for p in self._holes if after < p < expected]:
                del self._holes[hole]
        return events

    async def _up_to_a_hole(
        self, rows: Sequence[Any], after: int
    ) -> tuple[list[RecordedEvent], int]:
        """The envelopes of `rows` up to the first hole that may still fill, and the
        position after the last one returned."""
        events: list[RecordedEvent] = []
        expected = after + 1
        for index, row in enumerate(rows):
            position = row[_POSITION]
            if position != expected:
                first_sight = self._holes.get(expected) is None
                if not await self._hole_is_permanent(expected, row[-1]):
                    horizon = self._holes[expected]
                    if first_sight and horizon is not None:
                        self._note_later_holes(rows[index:], horizon)
                    break
            events.append(StoredEvent(*row[:-1]))
            expected = position + 1
        return events, expected

    async def _hole_is_permanent(self, position: int, xmin: int) -> bool:
        """Whether the hole starting at `position`, missing from a snapshot whose xmin is
        `xmin`, can never fill (see the module docstring)."""
        horizon = self._holes.get(position)
        if horizon is None:
            # Drawn after the read that saw the hole, the id is newer than any its owner can
            # hold (the module docstring's argument, from the first sight on: a rolled-back
            # hole then costs two reads, not three).
            horizon = int(await self._fetchval("SELECT pg_current_xact_id()"))
            self._holes[position] = horizon
            return False
        return xmin >= horizon

    def _note_later_holes(self, rows: Sequence[Any], horizon: int) -> None:
        """Give every further hole of one read the horizon drawn just after that read: the
        same argument holds for each of them (each lies before a visible position), so a
        reader passes a run of rolled-back holes together instead of one per three reads."""
        for before, row in pairwise(rows):
            gap = before[_POSITION] + 1
            if row[_POSITION] != gap:
                self._holes.setdefault(gap, horizon)

    async def read_events(
        self, where: EventFilter, *, after: int = 0, limit: int = 100,
        before: int | None = None, descending: bool = False,
    ) -> list[RecordedEvent]:
        params: list[Any] = [after]
        sql = f"{_SELECT_EVENTS} WHERE global_position > $1"

        def arg(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if before is not None:
            sql += f" AND global_position < {arg(before)}"
        if where.stream_id is not None:
            sql += f" AND stream_id = {arg(where.stream_id)}"
        if where.aggregates:
            prefixes = [f"{a}-" for a in where.aggregates]
            sql += f" AND left(stream_id, strpos(stream_id, '-')) = ANY({arg(prefixes)}::text[])"
        if where.types:
            sql += f" AND type = ANY({arg(list(where.types))}::text[])"
        if where.correlation_id is not None:
            sql += f" AND correlation_id = {arg(where.correlation_id)}"
        if where.since is not None:
            sql += f" AND occurred_at >= {arg(where.since)}"
        if where.until is not None:
            sql += f" AND occurred_at <= {arg(where.until)}"
        order = "global_position DESC" if descending else "global_position"
        rows = await self._fetch(f"{sql} ORDER BY {order} LIMIT {arg(limit)}", *params)
        with collector_paused():
            return [StoredEvent(*r) for r in rows]

    async def read_event(self, event_id: str) -> RecordedEvent:
        rows = await self._fetch(f"{_SELECT_EVENTS} WHERE event_id = $1", event_id)
        if not rows:
            raise NotFound(f"no event {event_id}")
        return StoredEvent(*rows[0])

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

    async def get_documents(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], JsonDict]:
        pairs = list(dict.fromkeys(keys))
        if len(pairs) < 2:
            return await super().get_documents(pairs)
        rows = await self._fetch(
            "SELECT collection, key, body FROM documents WHERE (collection, key) IN"
            " (SELECT * FROM unnest($1::text[], $2::text[]))",
            [c for c, _ in pairs], [k for _, k in pairs],
        )
        return {(row["collection"], row["key"]): row["body"] for row in rows}

    async def find_documents(
        self,
        collection: str,
        *,
        where: Mapping[str, str | int | bool] | None = None,
        after_key: str | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> list[tuple[str, JsonDict]]:
        sql = "SELECT key, body FROM documents WHERE collection = $1"
        params: list[Any] = [collection]
        if where:
            params.append(dict(where))
            sql += f" AND body @> ${len(params)}::jsonb"
        if after_key is not None:
            params.append(after_key)
            sql += f" AND key {'<' if descending else '>'} ${len(params)}"
        params.append(limit)
        order = "key DESC" if descending else "key"
        rows = await self._fetch(f"{sql} ORDER BY {order} LIMIT ${len(params)}", *params)
        return [(r[0], r[1]) for r in rows]

    # -- snapshots ----------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._fetchval(
            "INSERT INTO stream_snapshots (stream_id, version, schema_version, state, taken_at, "
            "event_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (stream_id, version) DO "
            "UPDATE SET schema_version = excluded.schema_version, state = excluded.state, "
            "taken_at = excluded.taken_at, event_at = excluded.event_at",
            snapshot.stream_id,
            snapshot.version,
            snapshot.schema_version,
            snapshot.state,
            snapshot.taken_at,
            snapshot.event_at,
        )

    async def load_snapshot(
        self,
        stream_id: str,
        *,
        max_version: int | None = None,
        until: datetime | None = None,
    ) -> Snapshot | None:
        rows = await self._fetch(
            "SELECT version, state, schema_version, taken_at, event_at FROM stream_snapshots "
            "WHERE stream_id = $1 AND ($2::integer IS NULL OR version <= $2) "
            "AND ($3::timestamptz IS NULL OR event_at <= $3) ORDER BY version DESC LIMIT 1",
            stream_id,
            max_version,
            until,
        )
        if not rows:
            return None
        version, state, schema_version, taken_at, event_at = rows[0]
        return Snapshot(stream_id, version, state, schema_version, taken_at, event_at)

    # -- outbox -------------------------------------------------------------------------

    @property
    def relays_outbox(self) -> bool | None:
        return (self._lease is not None and self._lease is self._listener) if self.outbox \
            else None

    async def outbox_backlog(self, *, log: bool = False) -> int:
        if not self.outbox:
            return 0
        published, shipped = self._outbox_at if self.relays_outbox else (None, None)
        if log:
            return int(await self._fetchval(_OUTBOX_UNSHIPPED, published, shipped))
        return int(await self._fetchval(_OUTBOX_BACKLOG, published))

    async def _read_all(self, after: int, limit: int) -> list[RecordedEvent]:
        return await self.read_all(after=after, limit=limit)

    def outbox_batch(self, limit: int, *, log: bool = False,
                     read: LogReader | None = None) -> AbstractOutboxBatch:
        return _PostgresOutboxBatch(self, limit, log, read)

    async def _outbox_positions(self) -> list[int] | None:
        """The positions published and shipped, if this process holds the outbox's lease
        (taking it if it can, at most every _LEASE_RETRY_S); None while another holds it."""
        listener = self._listener
        if listener is None:
            raise StorageError("the PostgreSQL event store is not open, or reconnecting")
        if self._lease is listener:
            return self._outbox_at
        if time.monotonic() - self._lease_tried < _LEASE_RETRY_S:
            return None
        self._lease_tried = time.monotonic()
        async with self._listener_lock:
            with _translated():
                if not await listener.fetchval("SELECT pg_try_advisory_lock(hashtext($1))",
                                               f"magasin-outbox:{self.schema}"):
                    return None
                # Read once the lease is held: the last holder moved them before it let go.
                rows = await listener.fetch(
                    f"SELECT name, position FROM {self._checkpoints} "
                    "WHERE name = ANY($1::text[])", [_PUBLISHED, _SHIPPED])
        at = {name: int(position) for name, position in rows}
        self._lease, self._outbox_at = listener, [at.get(_PUBLISHED, 0), at.get(_SHIPPED, 0)]
        log.info("this process relays the outbox of schema %s from position %d",
                 self.schema, self._outbox_at[0])
        return self._outbox_at

    async def _outbox_move(self, stage: int, position: int) -> None:
        """Move a stage's position to `position`, under the lease. A shipping saves both
        positions; a publish only when the position published went unsaved for
        _SAVE_EVERY_S (a relay that dies publishes again what it did not save)."""
        listener = self._listener
        if listener is None or self._lease is not listener:
            raise Unavailable("this process lost the outbox's lease with its connection: "
                              "the batch will be relayed again")
        self._outbox_at[stage] = max(self._outbox_at[stage], position)
        if stage == 1 or time.monotonic() - self._saved_at >= _SAVE_EVERY_S:
            await self._outbox_save(listener)

    async def _outbox_save(self, listener: Any) -> None:
        at = list(self._outbox_at)
        if at == self._outbox_saved:
            return
        async with self._listener_lock:
            with _translated():
                await listener.execute(
                    f"INSERT INTO {self._checkpoints} AS c (name, position) "
                    "VALUES ($1, $2), ($3, $4) ON CONFLICT (name) DO UPDATE "
                    "SET position = greatest(c.position, excluded.position)",
                    _PUBLISHED, at[0], _SHIPPED, at[1])
        self._outbox_saved, self._saved_at = at, time.monotonic()


class _PostgresOutboxBatch(AbstractOutboxBatch):
    """A stage's next events after its position in the log, read gap-safe (read_all), by
    the one process of the schema that holds the outbox's lease (or through `read`: the
    window of the log its process's readers share, which holds what it just committed); a
    clean exit moves the position past them. No row an event, and a statement a batch at
    most: the read, unless the window answers it. The moves are saved by the shipping,
    both positions in one statement, or after _SAVE_EVERY_S.

    The lease is a session advisory lock on the store's listener connection: the first
    relay to ask takes it and keeps it until its process ends or loses that connection
    (the server then lets go of it); the relays of the other processes get nothing, and
    try again at most every _LEASE_RETRY_S. Within the process, one batch of a stage at a
    time. The save commits without waiting for the disk (the listener's
    synchronous_commit is off): a server crash may forget it, and the events go again,
    duplicates the consumers' inboxes absorb, never a loss.
    """

    def __init__(self, store: PostgresEventStore, limit: int, log: bool,
                 read: LogReader | None) -> None:
        self._store = store
        self._limit = limit
        self._stage = int(log)
        self._read = read or store._read_all
        self._to: int | None = None

    async def __aenter__(self) -> list[RecordedEvent]:
        lock = self._store._outbox_locks[self._stage]
        await lock.acquire()
        try:
            return await self._claim()
        except BaseException:
            lock.release()
            raise

    async def _claim(self) -> list[RecordedEvent]:
        if not self._store.outbox:
            return []
        positions = await self._store._outbox_positions()
        if positions is None:
            return []  # another process relays
        published, shipped = positions
        if self._stage == 0:
            events = await self._read(published, self._limit)
        elif published > shipped:  # only what was published is shipped
            events = [e for e in await self._read(shipped, min(self._limit, published - shipped))
                      if e.global_position <= published]
        else:
            events = []
        if events:
            self._to = events[-1].global_position
        return events

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None and self._to is not None:
                await self._store._outbox_move(self._stage, self._to)
        finally:
            self._store._outbox_locks[self._stage].release()
