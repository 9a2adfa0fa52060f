"""A delivery's unit of work takes a cached aggregate without reading its stream; the
commit checks its version, and a conflict makes the next load read it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from magasin.eventstore.repository import Repository
from magasin.eventstore.sqlite import SqliteEventStore
from magasin.inventory.domain import StockItem
from magasin.shared.errors import ConcurrencyError
from magasin.shared.messages import NewEvent

stock = Repository(StockItem)


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[SqliteEventStore, SqliteEventStore]]:
    """Two processes' stores on one database: each has its own cache."""
    async with SqliteEventStore(tmp_path / "c.db") as a, SqliteEventStore(tmp_path / "c.db") as b:
        yield a, b


async def add(store: SqliteEventStore, n: int, *, trusted: bool = False) -> StockItem:
    async with store.transaction() as uow:
        uow.trusts_cache = trusted
        item = await stock.find(uow, "s1:p1") or StockItem.create("s1", "p1")
        item.add(n)
        stock.save(uow, item)
    return item


async def test_a_trusted_load_reads_no_event_and_a_stale_one_fails_then_reads(
    two: tuple[SqliteEventStore, SqliteEventStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    await add(a, 1)  # a caches the item at version 2 (created, added)
    reads: list[str] = []
    read_stream = a.read_stream

    async def counted(stream_id: str, **kw: object) -> object:
        reads.append(stream_id)
        return await read_stream(stream_id, **kw)  # type: ignore[arg-type]

    read_latest = a.read_latest

    async def counted_latest(stream_id: str) -> object:
        reads.append(stream_id)
        return await read_latest(stream_id)

    monkeypatch.setattr(a, "read_stream", counted)
    monkeypatch.setattr(a, "read_latest", counted_latest)
    assert (await add(a, 1, trusted=True)).available == 2
    assert reads == []

    await add(b, 10)  # another process moves the stream: a's cache is stale
    with pytest.raises(ConcurrencyError):
        await add(a, 1, trusted=True)
    assert (await add(a, 1, trusted=True)).available == 13  # read afresh this time
    assert reads == ["stock-s1:p1"]


async def test_a_read_only_decision_on_a_stale_aggregate_fails_once_its_process_knew_better(
    two: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    a, b = two
    await add(a, 1)
    await add(b, 1)  # a's cache misses this; a does not know of it yet either

    async def decide() -> None:
        async with a.transaction() as uow:
            uow.trusts_cache = True
            uow.mark_processed("inventory", "evt-1")
            item = await stock.get(uow, "s1:p1")
            assert item.available == 1  # stale: decided on, never written

    await decide()  # as a read just before b's commit would have: concurrent
    await a.append("other-1", [a_new_event()])  # a's head is now past b's event
    with pytest.raises(ConcurrencyError):
        async with a.transaction() as uow:
            uow.trusts_cache = True
            uow.mark_processed("inventory", "evt-2")
            await stock.get(uow, "s1:p1")
    assert not await a.is_processed("inventory", "evt-2")


def a_new_event() -> NewEvent:
    return NewEvent(type="ItemAdded", payload={"n": 1})
