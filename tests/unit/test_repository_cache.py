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


# -- a stream its handler expects to create: taken for missing without a read -------------


def counted_reads(store: SqliteEventStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Streams `store` reads from now on (events or latest snapshot)."""
    reads: list[str] = []
    for name in ("read_stream", "read_latest"):
        original = getattr(store, name)

        async def counted(stream_id: str, _original: object = original, **kw: object) -> object:
            reads.append(stream_id)
            return await _original(stream_id, **kw)  # type: ignore[operator]

        monkeypatch.setattr(store, name, counted)
    return reads


async def open_item(store: SqliteEventStore, *, guess: bool, write: bool = True,
                    event_id: str = "evt-1") -> StockItem | None:
    """A delivery that opens stock item s1:p9 unless it exists (`write`: create it then;
    else only mark the event processed); what `find` returned."""
    async with store.transaction() as uow:
        uow.trusts_cache = True
        uow.guesses_new = guess
        uow.mark_processed("inventory", event_id)
        found = await stock.find(uow, "s1:p9", likely_new=True)
        if found is None and write:
            item = StockItem.create("s1", "p9")
            item.add(1)
            stock.save(uow, item)
    return found


async def test_a_first_attempt_creates_what_it_expects_to_without_reading_it(
    two: tuple[SqliteEventStore, SqliteEventStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, _ = two
    reads = counted_reads(a, monkeypatch)
    assert await open_item(a, guess=True) is None
    assert reads == []
    assert [e.type for e in await a.read_stream("stock-s1:p9")] == ["StockAdded"]


async def test_a_wrong_guess_fails_at_commit_and_the_retry_reads(
    two: tuple[SqliteEventStore, SqliteEventStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    await open_item(b, guess=False, event_id="evt-b")  # another process created it
    reads = counted_reads(a, monkeypatch)
    with pytest.raises(ConcurrencyError):
        await open_item(a, guess=True)
    assert not await a.is_processed("inventory", "evt-1")
    found = await open_item(a, guess=False)  # the retry: a read, and it exists
    assert found is not None and found.available == 1
    assert reads == ["stock-s1:p9"]
    assert len(await a.read_stream("stock-s1:p9")) == 1  # nothing appended twice


async def test_a_guess_that_writes_nothing_is_checked_too(
    two: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    a, b = two
    await open_item(b, guess=False, event_id="evt-b")
    # Checked as a trusted load is: against what this process knew (its head), so once
    # it has seen past the other's commit, a decision on "missing" that wrote nothing fails.
    await a.append("other-1", [a_new_event()])
    with pytest.raises(ConcurrencyError):  # decided on "missing", wrote nothing to it
        await open_item(a, guess=True, write=False)
    assert not await a.is_processed("inventory", "evt-1")


async def test_a_stream_this_process_knows_is_never_guessed_missing(
    two: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    a, _ = two
    await open_item(a, guess=True)
    found = await open_item(a, guess=True, event_id="evt-2")  # its cache: no guess
    assert found is not None and found.available == 1
