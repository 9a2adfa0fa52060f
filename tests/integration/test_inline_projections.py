"""Inline projections on every store adapter: documents committed with their events, a
runner that passes what was applied inline without committing, applies what was not (another
process, a rebuild), and never overwrites a newer inline document."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from magasin.eventstore.store import ANY, NO_STREAM, EventStore
from magasin.projections import Projection, ProjectionRunner, ProjectionUnit, rebuild
from magasin.projections.inline import install
from magasin.shared.messages import JsonDict, NewEvent, RecordedEvent

MakeStore = Callable[..., Awaitable[EventStore]]
BALANCES = "bank.balances"
TIMEOUT = 20.0
Hook = Callable[[RecordedEvent, ProjectionUnit], Awaitable[None]]


def balances(after: Hook | None = None) -> Projection:
    """One document per account stream: its balance, the versions that made it, and the
    version it reflects (`after` runs once an event is applied: a test's pause)."""

    async def deposited(event: RecordedEvent, unit: ProjectionUnit) -> None:
        key = event.stream_id
        doc = await unit.get_document(BALANCES, key) or {"balance": 0, "made_by": [],
                                                          "version": 0}
        if doc["version"] >= event.stream_version:
            return
        doc["balance"] += event.payload["amount"]
        doc["made_by"] = [*doc["made_by"], event.stream_version]
        doc["version"] = event.stream_version
        unit.put_document(BALANCES, key, doc)
        if after is not None:
            await after(event, unit)

    return Projection("bank.balances", {"Deposited": deposited}, (BALANCES,), inline=True)


def deposits(*amounts: int) -> list[NewEvent]:
    return [NewEvent("Deposited", {"amount": a}) for a in amounts]


def counting_commits(store: EventStore) -> list[int]:
    """The number of operations of each commit of `store` from now on."""
    commits: list[int] = []
    commit = store.commit

    async def counted(operations):  # type: ignore[no-untyped-def]
        commits.append(len(operations))
        return await commit(operations)

    store.commit = counted  # type: ignore[method-assign]
    return commits


async def balance(store: EventStore, account: str) -> JsonDict | None:
    return await store.get_document(BALANCES, f"account-{account}")


async def reached(runner: ProjectionRunner, store: EventStore) -> None:
    assert await runner.reach(await store.last_position(), TIMEOUT)


async def test_a_unit_of_work_commits_the_inline_documents_with_its_events(
    store: EventStore,
) -> None:
    install(store, [balances()])
    commits = counting_commits(store)

    async with store.transaction() as uow:
        uow.append("account-a", deposits(10, 20), NO_STREAM)
    assert await balance(store, "a") == {"balance": 30, "made_by": [1, 2], "version": 2}
    await store.append("account-a", deposits(5), expected_version=2)

    assert await balance(store, "a") == {"balance": 35, "made_by": [1, 2, 3], "version": 3}
    assert len(commits) == 2  # one each: the events and their document


def counting_reads(store: EventStore) -> list[str]:
    """The keys of the balances `store` reads from now on."""
    reads: list[str] = []
    get_document = store.get_document

    async def counted(collection: str, key: str) -> JsonDict | None:
        if collection == BALANCES:
            reads.append(key)
        return await get_document(collection, key)

    store.get_document = counted  # type: ignore[method-assign]
    return reads


async def two_processes(
    store_factory: MakeStore,
) -> tuple[EventStore, EventStore, Projection]:
    """Two processes of one service on one database, the balances inline in both."""
    a, b = await store_factory(), await store_factory()
    projection = balances()
    install(a, [projection])
    install(b, [projection])
    return a, b, projection


async def test_a_unit_reads_a_document_back_only_when_another_process_moved_its_stream(
    store_factory: MakeStore,
) -> None:
    a, b, _ = await two_processes(store_factory)
    reads = counting_reads(a)
    await a.append("account-a", deposits(1), NO_STREAM)
    await a.append("account-a", deposits(2), expected_version=1)
    await a.append("account-a", deposits(4), expected_version=2)
    assert reads == [], "it read back a document it had just committed"

    await b.append("account-a", deposits(8), expected_version=3)
    await a.append("account-a", deposits(16), expected_version=4)
    assert reads == ["account-a"]  # a knew version 3 only: it read the stored one
    assert await balance(a, "a") == {"balance": 31, "made_by": [1, 2, 3, 4, 5],
                                     "version": 5}


async def test_a_runner_over_events_applied_inline_commits_nothing(
    store_factory: MakeStore,
) -> None:
    a, b, projection = await two_processes(store_factory)
    runners = [ProjectionRunner(s, [projection], poll_interval=0.05) for s in (a, b)]
    for runner in runners:
        await runner.start()
    try:
        commits = [counting_commits(a), counting_commits(b)]
        for n in range(5):
            await (a if n % 2 else b).append("account-a", deposits(n), expected_version=n)
        await (a if n % 2 else b).append("account-a", deposits(7), expected_version=5)
        for runner, store in zip(runners, (a, b), strict=True):
            await reached(runner, store)  # b's runner passes a's events after reading them
    finally:
        for runner in runners:
            await runner.stop()

    assert [len(c) for c in commits] == [2, 4]  # the appends alone
    assert await balance(a, "a") == {"balance": 17, "made_by": [1, 2, 3, 4, 5, 6],
                                     "version": 6}


async def test_a_runner_applies_what_was_appended_without_the_inline_projection(
    store_factory: MakeStore,
) -> None:
    a, elsewhere = await store_factory(), await store_factory()  # the latter installs none
    projection = balances()
    install(a, [projection])
    await a.append("account-a", deposits(1), NO_STREAM)
    await elsewhere.append("account-a", deposits(2), expected_version=1)
    await a.append("account-a", deposits(4), expected_version=2)  # on a lagging document
    await a.append("account-a", deposits(8))  # ANY: its version is not known before
    assert await balance(a, "a") == {"balance": 1, "made_by": [1], "version": 1}

    runner = ProjectionRunner(a, [projection], poll_interval=0.05)
    await runner.start()
    try:
        await reached(runner, a)
        assert await balance(a, "a") == {"balance": 15, "made_by": [1, 2, 3, 4], "version": 4}
        await a.append("account-a", deposits(16), expected_version=4)  # inline again
        assert await balance(a, "a") == {"balance": 31, "made_by": [1, 2, 3, 4, 5],
                                         "version": 5}
    finally:
        await runner.stop()


async def test_a_runner_cannot_overwrite_a_newer_inline_document(
    store_factory: MakeStore,
) -> None:
    """The runner reads the document at version 2 to apply 3 (appended without the inline
    projection) and pauses before committing; meanwhile a unit appends 4. Applied inline
    on the document it read, 4 would be lost under the runner's commit of 3, or 3 lost
    from the document; the unit leaves the lagging document to the runner instead."""
    a, elsewhere = await store_factory(), await store_factory()
    applying_3, go_on = asyncio.Event(), asyncio.Event()

    async def pause_at_3(event: RecordedEvent, unit: ProjectionUnit) -> None:
        if event.stream_version == 3:
            applying_3.set()
            await go_on.wait()

    projection = balances(after=pause_at_3)
    install(a, [projection])
    await a.append("account-a", deposits(1, 2), NO_STREAM)
    await elsewhere.append("account-a", deposits(4), expected_version=2)
    runner = ProjectionRunner(a, [projection], poll_interval=0.05)
    await runner.start()
    try:
        await asyncio.wait_for(applying_3.wait(), TIMEOUT)
        await a.append("account-a", deposits(8), expected_version=3)
        assert await balance(a, "a") == {"balance": 3, "made_by": [1, 2], "version": 2}
        go_on.set()
        await reached(runner, a)
    finally:
        await runner.stop()

    assert await balance(a, "a") == {"balance": 15, "made_by": [1, 2, 3, 4], "version": 4}


async def test_after_a_rebuild_the_runner_applies_what_the_new_documents_lack(
    store: EventStore,
) -> None:
    """Events applied inline while a rebuild fills its shadow go to the documents the swap
    replaces; the runner applies them to the new ones before `reach` says it is there."""
    late: list[int] = []

    async def meanwhile(event: RecordedEvent, unit: ProjectionUnit) -> None:
        if unit.rename and not late:  # the rebuild's first event: append more, inline
            late.append(event.global_position)
            await store.append("account-b", deposits(100), NO_STREAM)
            await store.append("account-a", deposits(200), expected_version=2)

    projection = balances(after=meanwhile)
    install(store, [projection])
    await store.append("account-a", deposits(1, 2), NO_STREAM)
    runner = ProjectionRunner(store, [projection], poll_interval=0.05)
    await runner.start()
    try:
        await reached(runner, store)
        await rebuild(store, projection)
        assert late
        await reached(runner, store)
        assert await balance(store, "a") == {"balance": 203, "made_by": [1, 2, 3],
                                             "version": 3}
        assert await balance(store, "b") == {"balance": 100, "made_by": [1], "version": 1}
        await store.append("account-a", deposits(400), expected_version=3)
        assert await balance(store, "a") == {"balance": 603, "made_by": [1, 2, 3, 4],
                                             "version": 4}
    finally:
        await runner.stop()


async def test_an_append_with_any_version_is_left_to_the_runner(store: EventStore) -> None:
    install(store, [balances()])
    await store.append("account-a", deposits(1), ANY)
    assert await balance(store, "a") is None
