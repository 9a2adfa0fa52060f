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
    return (await delivered(store, n, trusted=trusted))[1]


async def delivered(
    store: SqliteEventStore, n: int, *, ident: str = "s1:p1", trusted: bool = False,
    guess: bool = False, event_id: str | None = None, write: bool = True,
) -> tuple[StockItem | None, StockItem]:
    """A unit of work adding `n` to stock item `ident`, created if missing; with an
    `event_id`, a delivery's (its inbox mark, the cache trusted, the item a stream it
    expects to create, `guess`ing as a first attempt does). `write=False` decides without
    writing the item. Returns what `find` gave, and the item."""
    async with store.transaction() as uow:
        uow.trusts_cache = trusted or event_id is not None
        uow.guesses_new = guess
        if event_id is not None:
            uow.mark_processed("inventory", event_id)
        found = await stock.find(uow, ident, likely_new=event_id is not None)
        item = found or StockItem.create(*ident.split(":"))
        if write:
            item.add(n)
            stock.save(uow, item)
    return found, item


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


async def test_a_trusted_load_reads_no_event_and_a_stale_one_fails_then_reads(
    two: tuple[SqliteEventStore, SqliteEventStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    await add(a, 1)  # a caches the item at version 2 (created, added)
    reads = counted_reads(a, monkeypatch)
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


async def test_a_first_attempt_creates_what_it_expects_to_without_reading_it(
    two: tuple[SqliteEventStore, SqliteEventStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, _ = two
    reads = counted_reads(a, monkeypatch)
    found, _ = await delivered(a, 1, ident="s1:p9", guess=True, event_id="evt-1")
    assert found is None
    assert reads == []
    assert [e.type for e in await a.read_stream("stock-s1:p9")] == ["StockAdded"]


async def test_a_wrong_guess_fails_at_commit_and_the_retry_reads(
    two: tuple[SqliteEventStore, SqliteEventStore], monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two
    await delivered(b, 1, ident="s1:p9", event_id="evt-b")  # another process created it
    reads = counted_reads(a, monkeypatch)
    with pytest.raises(ConcurrencyError):
        await delivered(a, 1, ident="s1:p9", guess=True, event_id="evt-1")
    assert not await a.is_processed("inventory", "evt-1")
    found, item = await delivered(a, 1, ident="s1:p9", event_id="evt-1")  # the retry reads
    assert found is not None and item.available == 2
    assert reads == ["stock-s1:p9"]


async def test_a_guess_that_writes_nothing_is_checked_too(
    two: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    a, b = two
    await delivered(b, 1, ident="s1:p9", event_id="evt-b")
    # Checked as a trusted load is: against what this process knew (its head), so once
    # it has seen past the other's commit, a decision on "missing" that wrote nothing fails.
    await a.append("other-1", [a_new_event()])
    with pytest.raises(ConcurrencyError):
        await delivered(a, 1, ident="s1:p9", guess=True, event_id="evt-1", write=False)
    assert not await a.is_processed("inventory", "evt-1")


async def test_a_stream_this_process_knows_is_never_guessed_missing(
    two: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    a, _ = two
    await delivered(a, 1, ident="s1:p9", guess=True, event_id="evt-1")
    found, item = await delivered(a, 1, ident="s1:p9", guess=True, event_id="evt-2")
    assert found is not None and item.available == 2  # from its cache: no guess
