"""PostgreSQL-specific behaviour of the event store: gap-safe reading while transactions
commit out of order, races on event ids, outbox claims by several relays, notifications
between processes and error translation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from yarl import URL

from magasin.eventstore import postgres
from magasin.eventstore.postgres import (
    _OUTBOX_BACKLOG,
    _OUTBOX_UNSHIPPED,
    _READ_ALL,
    _SELECT_EVENTS,
    PostgresEventStore,
)
from magasin.eventstore.store import ANY, Append, MarkProcessed, PutDocument, SetCheckpoint
from magasin.eventstore.window import LogWindow
from magasin.shared.errors import (
    ConfigurationError,
    DuplicateEventError,
    StorageError,
    Unavailable,
)
from magasin.shared.messages import NewEvent, RecordedEvent

pytestmark = pytest.mark.postgres

MakeStore = Callable[..., Awaitable[PostgresEventStore]]
Connect = Callable[[], Awaitable[asyncpg.Connection]]


def ev(**payload: object) -> NewEvent:
    return NewEvent(type="ItemAdded", payload=payload or {"n": 1})


def ids(events: list[RecordedEvent]) -> list[str]:
    return [e.event_id for e in events]


@pytest.fixture
async def make_store(pg_database: str, pg_schema: str) -> AsyncIterator[MakeStore]:
    """Opens stores on one schema, as separate processes would; drops the schema after."""
    made: list[PostgresEventStore] = []

    async def make(outbox: bool = False, pool_max: int = 10,
                   dsn: str | None = None) -> PostgresEventStore:
        store = PostgresEventStore(dsn or pg_database, schema=pg_schema, outbox=outbox,
                                   pool_max=pool_max)
        await store.open()
        made.append(store)
        return store

    yield make
    for store in reversed(made):
        await store.close()
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(make_store: MakeStore) -> PostgresEventStore:
    return await make_store()


@pytest.fixture
async def connect(pg_database: str, pg_schema: str) -> AsyncIterator[Connect]:
    """Raw connections on the store's schema, to hold transactions open by hand."""
    conns: list[asyncpg.Connection] = []

    async def open_one() -> asyncpg.Connection:
        conn = await asyncpg.connect(pg_database, server_settings={"search_path": pg_schema})
        conns.append(conn)
        return conn

    yield open_one
    for conn in conns:
        await conn.close()


async def read_until(store: PostgresEventStore, count: int) -> list[str]:
    """Tail the log from the start until `count` events are read (fails after 5 s)."""
    seen: list[RecordedEvent] = []
    async with asyncio.timeout(5):
        while len(seen) < count:
            seen += await store.read_all(after=seen[-1].global_position if seen else 0)
            await store.wait_for_events(seen[-1].global_position if seen else 0, 0.02)
    return ids(seen)


async def test_reader_never_skips_an_event_whose_transaction_commits_late(
    store: PostgresEventStore, connect: Connect
) -> None:
    slow = await connect()
    tx = slow.transaction()
    await tx.start()
    late = await store._append(slow, Append("slow-1", (ev(),), ANY))
    fast = [e for i in range(3) for e in await store.append(f"fast-{i}", [ev()])]
    assert late[0].global_position < fast[0].global_position

    for _ in range(5):  # enough reads to go through every stage of judging a hole
        assert await store.read_all() == []
        await asyncio.sleep(0.01)
    await tx.commit()

    assert ids(await store.read_all()) == ids(late) + ids(fast)


async def test_reader_waits_for_a_writer_whose_id_is_newer_than_every_finished_one(
    store: PostgresEventStore, connect: Connect
) -> None:
    # The fast writer takes its transaction id first, the slow one after it: when the fast
    # one commits, the slow one's id is newer than every finished transaction, so the
    # snapshot's xmax says nothing about it.
    fast_conn, slow_conn = await connect(), await connect()
    fast_tx, slow_tx = fast_conn.transaction(), slow_conn.transaction()
    await fast_tx.start()
    await fast_conn.fetchval("SELECT pg_current_xact_id()")
    await slow_tx.start()
    late = await store._append(slow_conn, Append("slow-1", (ev(),), ANY))
    fast = await store._append(fast_conn, Append("fast-1", (ev(),), ANY))
    await fast_tx.commit()

    for _ in range(5):
        assert await store.read_all() == []
        await asyncio.sleep(0.01)
    await slow_tx.commit()

    assert ids(await store.read_all()) == ids(late) + ids(fast)


async def test_a_rolled_back_transaction_leaves_a_hole_the_reader_passes(
    store: PostgresEventStore, connect: Connect
) -> None:
    gone = await connect()
    tx = gone.transaction()
    await tx.start()
    await store._append(gone, Append("gone-1", (ev(),), ANY))
    await tx.rollback()
    fast = [e for i in range(3) for e in await store.append(f"fast-{i}", [ev()])]

    assert await store.read_all() == []  # the first sight of a hole never passes it
    # Three reads suffice when nothing else runs on the server; allow for other sessions.
    assert await read_until(store, len(fast)) == ids(fast)


async def test_a_retry_racing_its_original_returns_the_stored_events(
    store: PostgresEventStore, connect: Connect
) -> None:
    event = ev()
    original = await connect()
    tx = original.transaction()
    await tx.start()
    first = await store._append(original, Append("cart-1", (event,), ANY))
    retry = asyncio.create_task(store.append("cart-1", [event]))
    await asyncio.sleep(0.2)
    assert not retry.done()  # waits on the stream row the original holds
    await tx.commit()

    assert await retry == first
    assert len(await store.read_stream("cart-1")) == 1


async def test_an_event_id_committed_meanwhile_to_another_stream_is_a_duplicate(
    store: PostgresEventStore, connect: Connect
) -> None:
    event = ev()
    other = await connect()
    tx = other.transaction()
    await tx.start()
    await store._append(other, Append("cart-1", (event,), ANY))
    clash = asyncio.create_task(store.append("cart-2", [event]))
    await asyncio.sleep(0.2)
    assert not clash.done()  # waits on the event id index entry
    await tx.commit()

    with pytest.raises(DuplicateEventError):
        await clash
    assert await store.stream_version("cart-2") == 0


async def test_concurrent_retries_in_one_process_store_the_events_once(
    store: PostgresEventStore,
) -> None:
    event, repeated = ev(), ev()
    outcomes = await asyncio.gather(
        *(store.append("cart-1", [event]) for _ in range(4)),
        store.append("cart-2", [event]),
        store.append("cart-3", [repeated, repeated]),
        return_exceptions=True,
    )

    *retries, elsewhere, repeats = outcomes
    assert isinstance(retries[0], list)
    assert all(r == retries[0] for r in retries)
    assert isinstance(elsewhere, DuplicateEventError)
    assert isinstance(repeats, DuplicateEventError)
    assert ids(await store.read_all()) == [event.event_id]


async def test_a_unit_the_database_refuses_fails_alone(store: PostgresEventStore) -> None:
    # PostgreSQL's jsonb has no room for a NUL character; the unit committed with it fails.
    refused, accepted = await asyncio.gather(
        store.append("cart-1", [ev(note="\x00")]),
        store.append("cart-2", [ev()]),
        return_exceptions=True,
    )

    assert isinstance(refused, StorageError)
    assert isinstance(accepted, list)
    assert await read_until(store, 1) == ids(accepted)  # past the positions it burned


async def test_an_unreachable_server_raises_unavailable() -> None:
    with pytest.raises(Unavailable):
        await PostgresEventStore("postgresql://postgres@127.0.0.1:1/x").open()


async def test_stores_opened_at_once_on_a_new_schema_all_work(make_store: MakeStore) -> None:
    stores = await asyncio.gather(*(make_store() for _ in range(4)))
    for i, store in enumerate(stores):
        await store.append(f"cart-{i}", [ev()])
    assert len(await stores[0].read_all()) == 4


async def test_one_process_relays_the_outbox_and_another_takes_over_when_it_ends(
    make_store: MakeStore,
) -> None:
    first, second = await make_store(outbox=True), await make_store(outbox=True)
    sent = [e for i in range(10) for e in await first.append(f"order-{i}", [ev(n=i)])]

    async with first.outbox_batch(4) as batch, second.outbox_batch(4) as other:
        assert ids(batch) == ids(sent[:4])
        assert other == [], "two processes relayed at once"
    assert (first.relays_outbox, second.relays_outbox) == (True, False)
    async with first.outbox_batch(4, log=True) as shipped:
        assert ids(shipped) == ids(sent[:4])
    async with first.outbox_batch(2) as batch:
        assert ids(batch) == ids(sent[4:6])
    with pytest.raises(RuntimeError):
        async with first.outbox_batch(2) as batch:
            raise RuntimeError("the broker is down: this batch is not marked")
    more = [e for i in range(5) for e in await second.append(f"order-{i}", [ev(n=i)])]

    await first.close()  # its lease ends with its connection
    assert await second.outbox_backlog() == 4 + 5
    assert await second.outbox_backlog(log=True) == 2
    async with asyncio.timeout(5):
        while not (batch := await _relayed(second, 100)):
            await asyncio.sleep(0.1)  # it asks for the lease at most every second
    assert ids(batch) == ids(sent[6:] + more), "an event was relayed twice or never"
    assert second.relays_outbox
    async with second.outbox_batch(100, log=True) as shipped:
        assert ids(shipped) == ids(sent[4:] + more)
    assert (await second.outbox_backlog(), await second.outbox_backlog(log=True)) == (0, 0)


async def test_a_relay_saves_its_position_lazily_and_a_dead_one_s_unsaved_moves_go_again(
    make_store: MakeStore, pg_database: str, pg_schema: str
) -> None:
    first, second = await make_store(outbox=True), await make_store(outbox=True)
    sent = [e for i in range(6) for e in await first.append(f"order-{i}", [ev(n=i)])]
    assert ids(await _relayed(first, 2)) == ids(sent[:2])  # the first move is saved
    assert ids(await _relayed(first, 2)) == ids(sent[2:4])  # this one only in memory
    assert await first.outbox_backlog() == 2, "the relaying process counts its moves"
    assert await _saved(pg_database, pg_schema) == {"outbox:publish": sent[1].global_position,
                                                    "outbox:ship": 0}
    async with first.outbox_batch(10, log=True) as shipped:
        assert ids(shipped) == ids(sent[:4])
    assert await _saved(pg_database, pg_schema) == {"outbox:publish": sent[3].global_position,
                                                    "outbox:ship": sent[3].global_position}

    assert ids(await _relayed(first, 2)) == ids(sent[4:])  # not saved: then it dies
    first._listener.terminate()
    async with asyncio.timeout(5):
        while not (again := await _relayed(second, 100)):
            await asyncio.sleep(0.1)
    assert ids(again) == ids(sent[4:]), "published again: duplicates, never a loss"


async def _saved(dsn: str, schema: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch("SELECT name, position FROM checkpoints "
                                "WHERE name LIKE 'outbox:%'")
    finally:
        await conn.close()
    return {"outbox:publish": 0, "outbox:ship": 0} | {r["name"]: r["position"] for r in rows}


async def test_a_relay_that_reads_through_the_window_publishes_its_process_commits_without_a_read(
    make_store: MakeStore,
) -> None:
    store = await make_store(outbox=True)
    window = LogWindow(store, 100)
    reads: list[int] = []
    read_all = store.read_all

    async def counted(*, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        reads.append(after)
        return await read_all(after=after, limit=limit)

    store.read_all = counted  # type: ignore[method-assign]
    sent = [e for i in range(3) for e in await store.append(f"order-{i}", [ev(n=i)])]
    async with store.outbox_batch(10, read=window.read) as batch:
        assert ids(batch) == ids(sent)
    assert len(reads) == 1, "the window's first read"
    more = [e for i in range(3) for e in await store.append(f"order-{i}", [ev(n=i)])]
    async with store.outbox_batch(10, read=window.read) as batch:
        assert ids(batch) == ids(more)
    async with store.outbox_batch(10, log=True, read=window.read) as shipped:
        assert ids(shipped) == ids(sent + more)
    assert len(reads) == 1, "what the process committed came from the window"


async def _relayed(store: PostgresEventStore, limit: int) -> list[RecordedEvent]:
    async with store.outbox_batch(limit) as batch:
        return batch


async def test_an_outbox_kept_in_tables_by_an_earlier_version_becomes_its_positions(
    make_store: MakeStore, pg_database: str, pg_schema: str
) -> None:
    store = await make_store(outbox=True)
    sent = [e for i in range(6) for e in await store.append(f"order-{i}", [ev(n=i)])]
    await store.close()
    conn = await asyncpg.connect(pg_database, server_settings={"search_path": pg_schema})
    try:  # what the earlier version left: 2 published not shipped, 2 not published
        await conn.execute("DELETE FROM checkpoints WHERE name LIKE 'outbox:%'")
        await conn.execute("CREATE TABLE outbox (global_position bigint PRIMARY KEY)")
        await conn.execute("CREATE TABLE outbox_log (global_position bigint PRIMARY KEY)")
        await conn.executemany("INSERT INTO outbox VALUES ($1)",
                               [(e.global_position,) for e in sent[4:]])
        await conn.executemany("INSERT INTO outbox_log VALUES ($1)",
                               [(e.global_position,) for e in sent[2:4]])
    finally:
        await conn.close()

    store = await make_store(outbox=True)
    assert (await store.outbox_backlog(), await store.outbox_backlog(log=True)) == (2, 2)
    async with store.outbox_batch(10) as batch:
        assert ids(batch) == ids(sent[4:])
    async with store.outbox_batch(10, log=True) as shipped:
        assert ids(shipped) == ids(sent[2:])


async def test_wait_for_events_wakes_up_on_a_commit_in_another_process(
    make_store: MakeStore,
) -> None:
    writer, reader = await make_store(), await make_store()
    loop = asyncio.get_running_loop()

    async def later() -> None:
        await asyncio.sleep(0.05)
        await writer.append("cart-1", [ev()])

    task = asyncio.create_task(later())
    started = loop.time()
    await reader.wait_for_events(after=0, timeout=10)
    assert loop.time() - started < 5
    await task


class SlowLink:
    """A TCP relay to the server that hands on what the server sends `delay` seconds late:
    a database far away, where every round trip takes that long."""

    def __init__(self, dsn: str, delay: float) -> None:
        self._target = URL(dsn)
        self._delay = delay
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def dsn(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return str(self._target.with_host("127.0.0.1").with_port(port))

    async def __aenter__(self) -> SlowLink:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(
            self._target.host, self._target.port or 5432)
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            await asyncio.gather(_relay(client_r, server_w, 0.0),
                                 _relay(server_r, client_w, self._delay))
        finally:
            client_w.transport.abort()
            server_w.transport.abort()
            self._pipes.discard(task)


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 delay: float) -> None:
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()  # one side closed: so does the other


async def test_an_older_process_answers_newcomers_and_notifies_its_commits_over_a_slow_link(
    make_store: MakeStore, pg_database: str,
) -> None:
    """A process answers each newcomer's greeting on the connection that also carries its
    commits' notifications. With round trips that take a while, the answer is still on its
    way when the next commit is to be notified: both must go out (one operation at a time
    on that connection), or the newcomer misses that commit, or never learns of the older
    process and never wakes its readers with its own commits."""
    async with SlowLink(pg_database, delay=0.02) as link:
        older = await make_store(dsn=link.dsn, pool_max=2)
        try:
            await _greet_and_notify(older, make_store)
        finally:
            await older.close()  # while the link still stands


async def _greet_and_notify(older: PostgresEventStore, make_store: MakeStore) -> None:
    timeout = 5.0
    loop = asyncio.get_running_loop()
    for n in range(4):
        newcomers = await asyncio.gather(*(make_store(pool_max=2) for _ in range(2)))
        # Committed as the greetings reach the older process.
        (event,) = await older.append(f"cart-{n}", [ev(n=n)])
        for newcomer in newcomers:
            started = loop.time()
            while (newcomer.known_head() or 0) < event.global_position:
                assert loop.time() - started < timeout, (
                    f"round {n}: the older process's commit woke no newcomer")
                await newcomer.wait_for_events(newcomer.known_head() or 0, timeout)
        for i, newcomer in enumerate(newcomers):
            head = older.known_head() or 0
            (theirs,) = await newcomer.append(f"cart-{n}-{i}", [ev(n=i)])
            await older.wait_for_events(head, timeout)
            assert (older.known_head() or 0) >= theirs.global_position, (
                f"round {n}: newcomer {i}'s commit never woke the older process")


async def test_a_process_stops_notifying_a_peer_that_closed_or_died(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    older, newcomer = await make_store(), await make_store()
    await eventually_true(lambda: bool(older._peers) and bool(newcomer._peers))
    await newcomer.close()  # it says goodbye
    await eventually_true(lambda: not older._peers)

    gone = 2**31 - 1  # a peer that died: no session has this pid
    older._peers.add(gone)
    monkeypatch.setattr(postgres, "_PEERS_CHECK_S", 0.0)
    notified = older._peers_checked
    await older.append("cart-1", [ev()])  # notified, after a check of who still listens
    await eventually_true(lambda: older._peers_checked > notified)
    assert gone not in older._peers


async def eventually_true(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_reader_in_another_process_sees_8_writers_events_once_in_order(
    make_store: MakeStore,
) -> None:
    writer_store = await make_store(pool_max=8)
    reader_store = await make_store()
    writers, total = 8, 300
    expected: list[str] = []
    done = asyncio.Event()

    async def writer(w: int) -> None:
        for i in range(w, total, writers):
            event = ev(w=w, i=i)
            expected.append(event.event_id)
            await writer_store.append(f"w{w}-{i % 5}", [event])

    async def tail() -> list[RecordedEvent]:
        seen: list[RecordedEvent] = []
        after = 0
        while True:
            page = await reader_store.read_all(after=after, limit=20)
            seen += page
            if page:
                after = page[-1].global_position
            elif done.is_set() and after >= await reader_store.last_position():
                return seen
            else:
                await reader_store.wait_for_events(after, timeout=1)

    reader = asyncio.create_task(tail())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    seen = await asyncio.wait_for(reader, 60)

    positions = [e.global_position for e in seen]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions) == total, "an event was delivered twice"
    assert set(ids(seen)) == set(expected), "an event was skipped"


# -- plans on a server without autovacuum (issue 10) -----------------------------------------

LOAD_EVENTS = 50_000
HOT_STATEMENTS: dict[str, tuple[str, tuple[object, ...]]] = {
    # The two statements of magasin_append (sql/postgres.sql) that read a table.
    "append: ids stored?": (
        "SELECT EXISTS (SELECT 1 FROM events WHERE event_id = ANY ($1::text[]))",
        (["x", "y"],)),
    "append: move a stream": (
        "UPDATE streams AS s SET version = s.version + $3 WHERE s.stream_id = $1 "
        "AND s.version = $2", ("sale-7", 10, 1)),
    "retry: stored events": (
        f"{_SELECT_EVENTS} WHERE event_id = ANY($1::text[]) ORDER BY global_position", (["x"],)),
    "read_event": (f"{_SELECT_EVENTS} WHERE event_id = $1", ("x",)),
    "read_stream": (
        f"{_SELECT_EVENTS} WHERE stream_id = $1 AND stream_version >= $2 "
        "ORDER BY stream_version", ("sale-7", 1)),
    "read_all": (_READ_ALL, (25_000, 1000)),
    "read_events by correlation": (
        f"{_SELECT_EVENTS} WHERE global_position > $1 AND correlation_id = $2 "
        "ORDER BY global_position LIMIT $3", (0, "c", 100)),
    "last_position": ("SELECT coalesce(max(global_position), 0) FROM events", ()),
    "stream_version": ("SELECT version FROM streams WHERE stream_id = $1", ("sale-7",)),
    "outbox backlog": (_OUTBOX_BACKLOG, (None,)),
    "outbox backlog, to ship": (_OUTBOX_UNSHIPPED, (None, None)),
    "inbox": ("SELECT true FROM inbox WHERE consumer = $1 AND event_id = $2", ("c", "x")),
    "checkpoint, locked": (
        "SELECT position FROM checkpoints WHERE name = $1 FOR UPDATE", ("p-1",)),
    "document": (
        "SELECT body FROM documents WHERE collection = $1 AND key = $2", ("orders", "o-7")),
    "documents page": (
        "SELECT key, body FROM documents WHERE collection = $1 AND key > $2 "
        "ORDER BY key LIMIT $3", ("orders", "o-7", 100)),
    "snapshot": (
        "SELECT version FROM stream_snapshots WHERE stream_id = $1 "
        "AND ($2::integer IS NULL OR version <= $2) ORDER BY version DESC LIMIT 1",
        ("sale-7", None)),
}


async def _load(store: PostgresEventStore) -> None:
    """LOAD_EVENTS events the way services write them: single appends (group-committed),
    and a fifth in consumers' units (inbox mark, append, document, checkpoint)."""
    gate = asyncio.Semaphore(64)

    async def sale(i: int) -> None:
        async with gate:
            await store.append(f"sale-{i}", [ev(i=i, k=k) for k in range(10)])

    async def consumed(i: int) -> None:
        async with gate:
            await store.commit([
                MarkProcessed("c", f"in-{i}"),
                Append(f"order-{i}", tuple(ev(i=i, k=k) for k in range(10)), ANY),
                PutDocument("orders", f"o-{i}", {"i": i}),
                SetCheckpoint(f"p-{i % 5}", i),
            ])

    units = LOAD_EVENTS // 10
    await asyncio.gather(*(sale(i) for i in range(units * 4 // 5)),
                         *(consumed(i) for i in range(units // 5)))


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return f"ARRAY[{', '.join(map(_literal, value))}]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


async def _explain(conn: asyncpg.Connection, mode: str) -> dict[str, str]:
    """The plan of each prepared hot statement under `mode` (plan_cache_mode)."""
    plans = {}
    await conn.execute(f"SET plan_cache_mode = {mode}")
    try:
        for i, (name, (_, args)) in enumerate(HOT_STATEMENTS.items()):
            values = f"({', '.join(map(_literal, args))})" if args else ""
            rows = await conn.fetch(f"EXPLAIN EXECUTE hot_{i}{values}")
            plans[name] = "\n".join(r[0] for r in rows)
    finally:
        await conn.execute("RESET plan_cache_mode")
    return plans


async def _prepare(conn: asyncpg.Connection) -> None:
    """Prepare every hot statement and have the session cache its generic plan, as a
    session does once it ran a statement five times (asyncpg's statements, PL/pgSQL's)."""
    for i, (sql, _) in enumerate(HOT_STATEMENTS.values()):
        await conn.execute(f"PREPARE hot_{i} AS {sql}")
    await _explain(conn, "force_generic_plan")


async def _table_stats(conn: asyncpg.Connection, schema: str) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT s.relname, s.seq_tup_read, s.n_tup_ins, s.n_mod_since_analyze, s.last_analyze, "
        "c.reltuples "
        "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
        "WHERE s.schemaname = $1", schema)
    return {r["relname"]: r for r in rows}


async def test_a_new_schema_gets_its_statistics_when_opened(
    store: PostgresEventStore, pg_database: str, pg_schema: str
) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        stats = await _table_stats(conn, pg_schema)
    finally:
        await conn.close()
    assert {"events", "streams", "inbox", "checkpoints", "documents"} <= set(stats)
    assert [name for name, row in stats.items() if row["last_analyze"] is None] == []


async def _inserted(conn: asyncpg.Connection, schema: str, start: int, count: int) -> None:
    """`count` events written straight into the table, and the server's statistics sure to
    count them (a backend reports its changes only when idle, and may wait 10 s to)."""
    await conn.execute(
        "INSERT INTO events (global_position, event_id, stream_id, stream_version, type, "
        "schema_version, occurred_at, metadata, payload) "
        "SELECT nextval('events_global_position_seq'), 'e-' || i, 's-' || i, 1, 'T', 1, "
        "now(), '{}', jsonb_build_object('i', i) FROM generate_series($1::int, $2::int) i",
        start, start + count - 1)
    await conn.execute("SELECT pg_stat_force_next_flush()")
    async with asyncio.timeout(10):
        while (await _table_stats(conn, schema))["events"]["n_mod_since_analyze"] < count:
            await asyncio.sleep(0.05)


async def test_statistics_follow_a_growing_table_as_it_doubles_and_skip_the_bodies(
    store: PostgresEventStore, pg_database: str, pg_schema: str
) -> None:
    async with store._connection() as session:  # one of the store's own sessions
        assert await session.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    conn = await asyncpg.connect(pg_database, server_settings={"search_path": pg_schema})
    try:
        await _inserted(conn, pg_schema, 0, 200)
        assert "events" in await postgres._analyze_stale(conn)  # 200 > 50 + 0
        await _inserted(conn, pg_schema, 200, 150)
        assert "events" not in await postgres._analyze_stale(conn)  # 150 <= 50 + 200
        await _inserted(conn, pg_schema, 350, 200)  # 350 changes since the ANALYZE
        assert "events" in await postgres._analyze_stale(conn)  # 350 > 50 + 200
        gathered = {r["attname"] for r in await conn.fetch(
            "SELECT attname FROM pg_stats WHERE schemaname = $1 AND tablename = 'events'",
            pg_schema)}
    finally:
        await conn.close()
    assert {"stream_id", "event_id", "global_position"} <= gathered
    assert gathered.isdisjoint({"payload", "metadata", "traceparent", "causation_id"})


async def test_after_a_large_load_on_a_new_schema_every_hot_statement_uses_an_index(
    make_store: MakeStore, pg_database: str, pg_schema: str
) -> None:
    store = await make_store(outbox=True)
    async with store._connection() as session:  # one of the store's own sessions
        await _prepare(session)  # while the tables are empty
        await _load(store)
        plans = [await _explain(session, "force_generic_plan"),  # cached before the load
                 await _explain(session, "force_custom_plan")]
        await session.execute("DEALLOCATE ALL")
    scanned = [f"{name}:\n{plan}" for both in plans for name, plan in both.items()
               if "Seq Scan" in plan]
    assert scanned == [], "\n\n".join(scanned)

    await store.close()  # its sessions end, and report what they read
    conn = await asyncpg.connect(pg_database)
    try:
        async with asyncio.timeout(10):
            while (stats := await _table_stats(conn, pg_schema))["events"]["n_tup_ins"] \
                    < LOAD_EVENTS:
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    events = stats["events"]
    # Each append checking its ids by a sequential scan read the whole log each time.
    assert events["seq_tup_read"] < LOAD_EVENTS, dict(events)
    # Statistics followed the load: the planner knows the log is large. What the store
    # promises (_STALE_TABLES, _ANALYZE_CHECK_EVERY): a table is analyzed again once it has
    # changed by more rows than it held, looked at every 5,000 rows written, through
    # counters each backend flushes up to a second late. So the last ANALYZE may have seen
    # under half the load: a fresh-clone CI run saw it at 20,480 rows of 50,000 (the
    # counters then said 16,000), and no write came after to look again. Not analyzed
    # again means the last look, at most 5,000 rows before the end, saw at most as many
    # changes as rows: (50,000 - 5,000 - a second's lag) / 2, a third of the load at this
    # machine's rate. A quarter leaves room; never analyzed, it would be 0 or -1.
    assert events["reltuples"] >= LOAD_EVENTS / 4, dict(events)


async def test_a_store_refuses_to_open_for_a_cluster_the_server_cannot_serve(
    pg_database: str, pg_schema: str
) -> None:
    conn = await asyncpg.connect(pg_database)
    try:
        allowed = int(await conn.fetchval(
            "SELECT current_setting('max_connections')::integer "
            "- current_setting('superuser_reserved_connections')::integer "
            "- coalesce(current_setting('reserved_connections', true)::integer, 0)"))
    finally:
        await conn.close()
    fitting = allowed // 3  # processes of pool 2 (+ listener) the server can serve

    over = PostgresEventStore(pg_database, schema=pg_schema, pool_max=2,
                              cluster_processes=fitting + 1)
    with pytest.raises(ConfigurationError, match=f"but the server allows {allowed} "):
        await over.open()
    within = PostgresEventStore(pg_database, schema=pg_schema, pool_max=2,
                                cluster_processes=fitting)
    await within.open()
    await within.close()
