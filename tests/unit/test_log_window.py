"""The shared window over the log's tail takes this process's commits without a read when
they continue it, and reads otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.eventstore.window import LogWindow
from magasin.shared.clock import utcnow
from magasin.shared.messages import NewEvent, RecordedEvent


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    async with SqliteEventStore(tmp_path / "w.db") as store:
        yield store


def ev(n: int) -> NewEvent:
    return NewEvent(type="ItemAdded", payload={"n": n})


async def test_own_commits_that_continue_the_window_join_it_without_a_read(
    store: SqliteEventStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    window = LogWindow(store, 100)
    await store.append("cart-1", [ev(1)])
    assert [e.payload["n"] for e in await window.read(0, 10)] == [1]  # read: the start

    reads: list[int] = []
    read_all = store.read_all

    async def counted(*, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        reads.append(after)
        return await read_all(after=after, limit=limit)

    monkeypatch.setattr(store, "read_all", counted)
    await store.append("cart-1", [ev(2), ev(3)])
    assert [e.payload["n"] for e in await window.read(1, 10)] == [2, 3]
    assert await window.read(3, 10) == []  # the window knows it reached the head
    assert reads == []


async def test_commits_that_leave_a_position_missing_are_read() -> None:
    class Quiet:
        def on_commit(self, _: object) -> None: ...

        def known_head(self) -> None:
            return None

    window = LogWindow(Quiet(), 100)  # type: ignore[arg-type]
    window.start = 5

    def at(position: int) -> RecordedEvent:
        return RecordedEvent(event_id=str(position), type="ItemAdded", schema_version=1,
                             stream_id="cart-1", stream_version=position,
                             global_position=position, occurred_at=utcnow(),
                             correlation_id=None, causation_id=None, traceparent=None,
                             metadata={}, payload={})

    window._committed([at(7)])  # 6 is missing: another process's, not committed yet
    assert window.events == []
    window._committed([at(6), at(7)])
    assert [e.global_position for e in window.events] == [6, 7]


async def test_a_follower_is_woken_by_a_commit_of_what_it_handles_not_by_every_commit(
    store: SqliteEventStore,
) -> None:
    window = LogWindow(store, 100)
    await store.append("cart-1", [ev(1)])
    head = await store.last_position()

    async def settle() -> None:
        for _ in range(20):  # let every task that was woken run
            await asyncio.sleep(0)

    odd = asyncio.create_task(window.wait(
        head, 30.0, {"ItemAdded"}, lambda e: e.payload["n"] % 2 == 1))
    removed = asyncio.create_task(window.wait(head, 30.0, {"ItemRemoved"}))
    anything = asyncio.create_task(window.wait(head, 30.0))
    await settle()
    await store.append("cart-1", [ev(2)])  # an ItemAdded that `odd` does not take
    await settle()
    assert anything.done()
    assert not odd.done() and not removed.done()

    await store.append("cart-1", [ev(2), ev(3)])  # one of them it takes
    await settle()
    assert odd.done()
    assert not removed.done()
    window.wake_all()
    await settle()
    assert removed.done()


async def test_a_follower_behind_the_head_does_not_wait(store: SqliteEventStore) -> None:
    window = LogWindow(store, 100)
    await store.append("cart-1", [ev(1)])
    # Something it may handle was committed past where it stands: it reads now.
    await asyncio.wait_for(window.wait(0, 30.0, {"ItemRemoved"}), 1.0)
