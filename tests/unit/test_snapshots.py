"""Snapshots of aggregates: taken every N events, used when loading, ignored when stale."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from magasin.eventstore.repository import Repository, configure_snapshots
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.inventory.domain import Reservation, StockItem
from magasin.shared.events import SaleLine, StockLine
from magasin.transactions.domain import Status, Transaction

stock = Repository(StockItem)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    async with SqliteEventStore(tmp_path / "snapshots.db") as store:
        yield store


async def restock(store: SqliteEventStore, times: int, ident: str = "s1:p1") -> None:
    for _ in range(times):
        async with store.transaction() as uow:
            item = await stock.find(uow, ident) or StockItem.create(*ident.split(":"))
            item.add(1)
            stock.save(uow, item)


async def test_a_snapshot_is_taken_every_n_events_and_loading_starts_from_it(
    db: SqliteEventStore,
) -> None:
    configure_snapshots(db, 10)
    await restock(db, 25)  # loads at versions 0..24: a snapshot at 10 and at 20

    snap = await db.load_snapshot("stock-s1:p1")
    assert snap is not None and snap.version == 20
    assert snap.schema_version == StockItem.snapshot_version

    async with SqliteEventStore(db.path) as other:  # nothing in memory there
        configure_snapshots(other, 10)
        rebuilt = await stock.rebuild(other, "s1:p1")
        async with other.transaction() as uow:
            loaded = await stock.get(uow, "s1:p1")
    assert rebuilt is not None
    assert (rebuilt.snapshot_version, rebuilt.events_replayed) == (20, 5)
    assert (loaded.version, loaded.received) == (25, 25)


async def test_a_snapshot_of_an_older_state_schema_is_ignored_never_misread(
    db: SqliteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_snapshots(db, 10)
    await restock(db, 12)
    # The snapshot says 1000 units: a state the events never produced, so using it shows.
    snap = await db.load_snapshot("stock-s1:p1")
    assert snap is not None
    await db.save_snapshot(
        type(snap)(snap.stream_id, snap.version, {**snap.state, "received": 1000},
                   snap.schema_version, event_at=snap.event_at)
    )
    monkeypatch.setattr(StockItem, "snapshot_version", StockItem.snapshot_version + 1)

    async with SqliteEventStore(db.path) as other:
        configure_snapshots(other, 10)
        rebuilt = await stock.rebuild(other, "s1:p1")
        async with other.transaction() as uow:
            loaded = await stock.get(uow, "s1:p1")
    assert rebuilt is not None and rebuilt.snapshot_version is None
    assert rebuilt.aggregate.received == loaded.received == 12


async def test_a_snapshot_missing_an_attribute_of_the_class_is_ignored(
    db: SqliteEventStore,
) -> None:
    configure_snapshots(db, 10)
    await restock(db, 11)
    snap = await db.load_snapshot("stock-s1:p1")
    assert snap is not None
    state = {k: v for k, v in snap.state.items() if k != "available"}
    await db.save_snapshot(type(snap)(snap.stream_id, 11, state, snap.schema_version))
    await restock(db, 1)

    async with SqliteEventStore(db.path) as other:
        rebuilt = await stock.rebuild(other, "s1:p1")
    assert rebuilt is not None and rebuilt.snapshot_version is None
    assert rebuilt.aggregate.received == 12


async def test_a_stock_snapshot_taken_before_issue_11_is_ignored(db: SqliteEventStore) -> None:
    # Stock items kept on_hand and reserved then (snapshot version 1); their events say
    # the same, read as received and available now.
    configure_snapshots(db, 10)
    await restock(db, 11)
    snap = await db.load_snapshot("stock-s1:p1")
    assert snap is not None and snap.schema_version == StockItem.snapshot_version == 2
    old = {"store_id": snap.state["store_id"], "product_id": snap.state["product_id"],
           "on_hand": 11, "reserved": 0}
    await db.save_snapshot(type(snap)(snap.stream_id, 11, old, 1))

    async with SqliteEventStore(db.path) as other:
        rebuilt = await stock.rebuild(other, "s1:p1")
    assert rebuilt is not None and rebuilt.snapshot_version is None
    assert (rebuilt.aggregate.received, rebuilt.aggregate.available) == (11, 11)


async def test_with_snapshots_off_none_is_taken(db: SqliteEventStore) -> None:
    configure_snapshots(db, 0)
    await restock(db, 30)
    assert await db.load_snapshot("stock-s1:p1") is None


async def test_a_rebuild_as_of_a_version_or_a_moment_starts_from_the_snapshot_before_it(
    db: SqliteEventStore,
) -> None:
    configure_snapshots(db, 10)
    await restock(db, 35)
    events = await db.read_stream("stock-s1:p1")

    at_17 = await stock.rebuild(db, "s1:p1", version=17)
    as_of = await stock.rebuild(db, "s1:p1", until=events[26].occurred_at)
    assert at_17 is not None and as_of is not None
    assert (at_17.aggregate.received, at_17.snapshot_version) == (17, 10)
    assert (as_of.aggregate.version, as_of.snapshot_version) == (27, 20)
    before = events[0].occurred_at - timedelta(seconds=1)
    assert await stock.rebuild(db, "s1:p1", until=before) is None


def test_snapshots_restore_tuples_enums_dataclasses_and_instants_exactly() -> None:
    reservation = Reservation("tx-1")
    reservation.reserve("r-1", "s1", [StockLine("p1", 2), StockLine("p2", 1)],
                        datetime(2024, 1, 15, 10, 30, tzinfo=UTC))

    back = Reservation.from_snapshot("tx-1", 0, reservation.snapshot())
    assert vars(back) | {"pending": []} == vars(reservation) | {"pending": []}
    assert back.lines == (StockLine("p1", 2), StockLine("p2", 1))


def test_the_state_view_is_plain_json_with_public_properties() -> None:
    sale = Transaction.create("t1", store_id="s1", customer_id="c",
                              lines=[SaleLine("p1", 2, 500)], currency="CAD",
                              payment_method="VISA")

    view = sale.state()
    assert view["status"] == Status.PENDING.value
    assert view["lines"] == [{"product_id": "p1", "quantity": 2, "unit_price": 500}]
    assert (view["id"], view["total"]) == ("t1", 1000)
    assert "pending" not in view


async def test_after_a_commit_the_next_load_reads_none_of_its_own_events(
    db: SqliteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await restock(db, 3)
    read: list[int] = []
    original = db.read_stream

    async def counting(stream: str, **kw: object) -> list:  # type: ignore[type-arg]
        events = await original(stream, **kw)  # type: ignore[arg-type]
        read.append(len(events))
        return events

    monkeypatch.setattr(db, "read_stream", counting)
    await restock(db, 2)
    # Each load started from the state the previous commit stored, and the store knew
    # that nobody appended since (its own writer committed last): no read at all.
    assert read == []

    # Another writer (another process, say) appends behind this cache's back: the next load
    # still reads what it wrote, so the cached state is a starting point, never the answer.
    async with SqliteEventStore(db.path) as other, other.transaction() as uow:
        item = await stock.get(uow, "s1:p1")
        item.add(10)
        stock.save(uow, item)
    async with db.transaction() as uow:
        loaded = await stock.get(uow, "s1:p1")
    assert read[-1] == 1 and (loaded.version, loaded.received) == (6, 15)
