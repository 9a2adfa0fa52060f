"""Projections on every store adapter: checkpoints committed with documents, restarts,
competing runners, lag, and a rebuild that swaps in while live updates keep coming."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

import pytest

from magasin.eventstore.store import EventStore, Operation, PutDocument
from magasin.projections import (
    Projection,
    ProjectionRunner,
    ProjectionUnit,
    catch_up,
    lags,
    rebuild,
)
from magasin.projections import projection as projection_module
from magasin.projections import runner as runner_module
from magasin.projections.projection import DocumentCache, fenced, generation_name, project
from magasin.projections.rebuild import MEMORY_LIMIT
from magasin.projections.runner import fresh, status_of
from magasin.shared.clock import utcnow
from magasin.shared.messages import JsonDict, NewEvent, RecordedEvent

MakeStore = Callable[..., Awaitable[EventStore]]
ACCOUNTS = "bank.accounts"
TIMEOUT = 20.0


def accounts(fail_on: int | None = None, collection: str = ACCOUNTS,
             background: bool = False) -> Projection:
    """Balance per account, and how many deposits made it: a double count shows."""

    async def deposited(event: RecordedEvent, unit: ProjectionUnit) -> None:
        if event.payload["amount"] == fail_on:
            raise RuntimeError("this deposit cannot be projected")
        account = event.payload["account"]
        doc = await unit.get_document(collection, account) or {"balance": 0, "deposits": 0}
        doc["balance"] += event.payload["amount"]
        doc["deposits"] += 1
        unit.put_document(collection, account, doc)

    return Projection(collection, {"Deposited": deposited}, (collection,),
                      background=background)


async def deposit(store: EventStore, account: str, *amounts: int, ago: float = 0) -> None:
    at = utcnow() - timedelta(seconds=ago)
    events = [NewEvent("Deposited", {"account": account, "amount": a}, occurred_at=at)
              for a in amounts]
    await store.append(f"account-{account}", events)


async def documents(store: EventStore, collection: str = ACCOUNTS) -> dict[str, JsonDict]:
    return dict(await store.find_documents(collection, limit=10_000))


async def from_scratch(store: EventStore, projection: Projection) -> dict[str, JsonDict]:
    """What projecting the whole log once, in memory, gives."""
    unit = ProjectionUnit(store, {ACCOUNTS: "unused"}, DocumentCache(complete=True))
    after = 0
    while page := await store.read_all(after=after, limit=1000):
        await project(projection, page, unit)
        after = page[-1].global_position
    return {key: body for (_, key), body in unit.changes.items() if body is not None}


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not await check():
            await asyncio.sleep(0.01)


async def caught_up(store: EventStore, projection: Projection) -> bool:
    return await store.get_checkpoint(projection.checkpoint) == await store.last_position()


async def test_a_runner_commits_each_batch_with_its_checkpoint(store: EventStore) -> None:
    projection = accounts()
    await deposit(store, "alice", 10, 20)
    runner = ProjectionRunner(store, [projection], poll_interval=0.05)
    await runner.start()
    try:
        await deposit(store, "bob", 5)
        await until(lambda: caught_up(store, projection))
    finally:
        await runner.stop()

    assert await documents(store) == {
        "alice": {"balance": 30, "deposits": 2}, "bob": {"balance": 5, "deposits": 1},
    }


def count_batches(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The events each projection's runner commits in each of its batches, by name."""
    batches: dict[str, list[int]] = {}
    real = runner_module.commit_batch

    async def counted(store: EventStore, projection: Projection, unit: ProjectionUnit,
                      after: int, through: int, generation: int) -> None:
        await real(store, projection, unit, after, through, generation)
        batches.setdefault(projection.name, []).append(through - after)

    monkeypatch.setattr(runner_module, "commit_batch", counted)
    return batches


async def test_a_lingering_runner_commits_what_came_meanwhile_in_one_batch(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = count_batches(monkeypatch)
    projection = accounts()
    runner = ProjectionRunner(store, [projection], poll_interval=0.05, linger=2.0)
    await runner.start()
    try:
        await deposit(store, "alice", 10)  # the first after a quiet spell: projected at once
        await until(lambda: caught_up(store, projection))
        for n in range(1, 6):  # five commits while the runner lingers
            await deposit(store, "bob", n)
        await until(lambda: caught_up(store, projection))
    finally:
        await runner.stop()

    assert batches == {ACCOUNTS: [1, 5]}
    assert await documents(store) == {
        "alice": {"balance": 10, "deposits": 1}, "bob": {"balance": 15, "deposits": 5},
    }


async def test_without_foreground_linger_only_a_background_projection_lingers(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded: a client reads the sales' and the stock's documents right after a sale,
    nobody the audit chain's."""
    batches = count_batches(monkeypatch)
    read_at_once, background = accounts(), accounts(collection="ledger", background=True)
    runner = ProjectionRunner(store, [read_at_once, background], poll_interval=0.05,
                              linger=60.0, foreground_linger=False)
    await runner.start()
    try:
        for n in range(1, 4):
            await deposit(store, "bob", n)
            await until(lambda: caught_up(store, read_at_once))
    finally:
        await runner.stop()

    assert batches == {ACCOUNTS: [1, 1, 1], "ledger": [1]}  # lingering on the 2 others
    assert await documents(store) == {"bob": {"balance": 6, "deposits": 3}}


async def test_a_request_hurries_a_lingering_projection_up_to_the_head(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fresh`: a client reading the stock a sale it saw end has moved waits for the
    runner to project what was committed before it asked (in one batch), not for the
    linger to end."""
    batches = count_batches(monkeypatch)
    projection = accounts(background=True)
    runner = ProjectionRunner(store, [projection], poll_interval=0.05, linger=60.0,
                              foreground_linger=False)
    assert await fresh(store, projection.name)  # no runner of it here yet: nothing to wait
    await runner.start()
    try:
        await deposit(store, "bob", 1)  # projected at once; the runner lingers from here
        await until(lambda: caught_up(store, projection))
        await deposit(store, "bob", 2)
        await deposit(store, "alice", 5)
        assert await documents(store) == {"bob": {"balance": 1, "deposits": 1}}

        assert await fresh(store, projection.name, timeout=5.0)

        assert await documents(store) == {
            "alice": {"balance": 5, "deposits": 1}, "bob": {"balance": 3, "deposits": 2},
        }
        assert batches == {ACCOUNTS: [1, 2]}
    finally:
        await runner.stop()


async def test_a_failing_event_leaves_documents_and_checkpoint_as_they_were(
    store: EventStore,
) -> None:
    await deposit(store, "alice", 10)
    await catch_up(store, accounts())
    before = await store.get_checkpoint("projection:bank.accounts")
    await deposit(store, "alice", 1, 666, 2)  # one batch; the second event cannot project

    runner = ProjectionRunner(store, [accounts(fail_on=666)], poll_interval=0.05)
    await runner.start()
    try:
        async def failing() -> bool:
            return [lag.status for lag in await lags(store)] == ["failing"]

        await until(failing)
    finally:
        await runner.stop()

    assert await store.get_checkpoint("projection:bank.accounts") == before
    assert await documents(store) == {"alice": {"balance": 10, "deposits": 1}}


async def test_a_restarted_runner_resumes_after_its_checkpoint(
    store_factory: MakeStore,
) -> None:
    first = await store_factory()
    projection = accounts()
    runner = ProjectionRunner(first, [projection], poll_interval=0.05)
    await runner.start()
    await deposit(first, "alice", *range(1, 51))
    await until(lambda: caught_up(first, projection))
    await runner.stop()
    await first.close()

    second = await store_factory()  # the same database, as after a restart
    await deposit(second, "alice", 100)
    runner = ProjectionRunner(second, [projection], poll_interval=0.05)
    await runner.start()
    try:
        await until(lambda: caught_up(second, projection))
    finally:
        await runner.stop()

    assert await documents(second) == {"alice": {"balance": sum(range(1, 51)) + 100,
                                                 "deposits": 51}}


async def test_two_runners_of_one_projection_project_each_event_once(
    store_factory: MakeStore,
) -> None:
    a, b = await store_factory(), await store_factory()  # two processes of one service
    projection = accounts()
    runners = [ProjectionRunner(s, [projection], page_size=7, poll_interval=0.02)
               for s in (a, b)]
    for runner in runners:
        await runner.start()
    try:
        for n in range(30):
            await deposit(a if n % 2 else b, f"acc-{n % 3}", *range(1, 6))
        await until(lambda: caught_up(a, projection))
    finally:
        for runner in runners:
            await runner.stop()

    assert await documents(a) == await from_scratch(a, projection)
    assert sum(doc["deposits"] for doc in (await documents(a)).values()) == 150


async def test_lag_counts_the_events_and_the_age_of_the_oldest_not_projected(
    store: EventStore,
) -> None:
    projection = accounts()
    await deposit(store, "alice", 1)
    await catch_up(store, projection)
    await deposit(store, "alice", 2, 3, ago=60)
    await deposit(store, "bob", 4, ago=5)

    (lag,) = await lags(store, [projection])
    head = await store.last_position()
    assert (lag.name, lag.head, lag.checkpoint, lag.lag_events) == (
        "bank.accounts", head, head - 3, 3,
    )
    assert 59 <= lag.lag_seconds < 120
    assert lag.status == "stopped"

    await catch_up(store, projection)
    (lag,) = await lags(store, [projection])
    assert (lag.lag_events, lag.lag_seconds) == (0, 0)


async def test_lags_lists_the_projections_a_runner_keeps_on_this_store(
    store: EventStore,
) -> None:
    runner = ProjectionRunner(store, [accounts()], poll_interval=0.05)
    await runner.start()
    try:
        async def listed() -> bool:
            return [(x.name, x.status) for x in await lags(store)] == [
                ("bank.accounts", "caught_up")
            ]

        await until(listed)
    finally:
        await runner.stop()
    assert await lags(store) == []


def competing_process() -> tuple[Projection, set[int]]:
    """The accounts projection of one process of a service, and the positions whose change
    it heard of: committed by its runner, or told by `elsewhere` (the other's commit)."""
    seen: set[int] = set()
    base = accounts()

    async def deposited(event: RecordedEvent, unit: ProjectionUnit) -> None:
        await base.handlers["Deposited"](event, unit)
        unit.after_commit(lambda: seen.add(event.global_position))

    async def elsewhere(_: EventStore, events: list[RecordedEvent]) -> None:
        seen.update(e.global_position for e in events)

    return dataclasses.replace(base, handlers={"Deposited": deposited}, elsewhere=elsewhere), seen


async def each_told_of_every_deposit(store: EventStore, *processes: tuple[Projection, set[int]]
                                     ) -> None:
    one = processes[0][0]
    await until(lambda: caught_up(store, one))
    everything = {e.global_position for e in await store.read_all(limit=100_000)
                  if e.type == "Deposited"}

    async def all_told() -> bool:
        return all(seen >= everything for _, seen in processes)

    try:
        await until(all_told)
    except TimeoutError as timeout:
        missed = [sorted(everything - seen) for _, seen in processes]
        raise AssertionError(f"deposits each process never heard of: {missed}") from timeout


async def test_competing_runners_each_see_every_event_committed_by_them_or_elsewhere(
    store: EventStore,
) -> None:
    """Two processes of a service project the same log: whichever loses a batch is told what
    the other committed (its live clients must hear of every change)."""
    processes = competing_process(), competing_process()
    runners = [ProjectionRunner(store, [p], page_size=4, poll_interval=0.01)
               for p, _ in processes]
    for runner in runners:
        await runner.start()
    try:
        for n in range(30):
            await deposit(store, f"acc-{n % 3}", *range(1, 5))
            await asyncio.sleep(0)
        await each_told_of_every_deposit(store, *processes)
    finally:
        for runner in runners:
            await runner.stop()
    assert await documents(store) == await from_scratch(store, processes[0][0])


TRUSTED_S = 0.05
"""Longer than the runners' poll interval: a runner may find the log quiet meanwhile."""


async def test_a_runner_whose_reads_stop_short_is_still_told_every_change_made_elsewhere(
    store: EventStore,
) -> None:
    """A read of the log may come back short of what is committed: at a hole whose writer
    has not finished, or from a window that trusts a read that found the end a moment
    before another process committed. A runner that loses a batch, or a checkpoint move
    over events its projection ignores, must still be told every change the other process
    projected past it, however far its own reads got (else a client following that sale
    on this process never hears of it)."""
    clock = asyncio.get_running_loop().time
    ended = (-1, 0.0)  # where the last read that found events ended, and when

    async def trusting_its_last_read(after: int, limit: int) -> list[RecordedEvent]:
        """Like the window of the log a process's projections share, which trusts a read
        that reached the end for a moment: from there, it finds nothing meanwhile (the
        other process's commits are not known here yet)."""
        nonlocal ended
        if ended[0] == after and clock() - ended[1] < TRUSTED_S:
            return []
        page = await store.read_all(after=after, limit=limit)
        if page:
            ended = (page[-1].global_position, clock())
        return page

    processes = competing_process(), competing_process()
    runners = [
        ProjectionRunner(store, [processes[0][0]], page_size=10, poll_interval=0.01),
        ProjectionRunner(store, [processes[1][0]], read=trusting_its_last_read, page_size=1,
                         poll_interval=0.01),
    ]
    for runner in runners:
        await runner.start()
    try:
        for n in range(40):
            await deposit(store, f"acc-{n % 3}", n + 1)
            # Events the projection ignores: the runners move the checkpoint over them.
            await store.append(f"audit-{n}", [NewEvent("Audited", {"n": n})])
            if n % 4 == 0:
                await asyncio.sleep(0.02)  # the log goes quiet now and then
        await each_told_of_every_deposit(store, *processes)
    finally:
        for runner in runners:
            await runner.stop()
    assert await documents(store) == await from_scratch(store, processes[0][0])


# The rebuilt documents stay in memory up to a limit, then spill into shadow collections:
# every rebuild test runs both ways.
IN_MEMORY, SPILLED = MEMORY_LIMIT, 2


@pytest.mark.parametrize("memory_limit", [IN_MEMORY, SPILLED], ids=["in_memory", "spilled"])
async def test_a_rebuild_swaps_in_while_live_updates_keep_coming_and_loses_none(
    store: EventStore, memory_limit: int,
) -> None:
    projection = accounts()
    for n in range(20):
        await deposit(store, f"acc-{n % 5}", *range(1, 11))
    await catch_up(store, projection)
    async with store.transaction() as uow:  # a bug once wrote a wrong balance
        uow.put_document(ACCOUNTS, "acc-0", {"balance": -1, "deposits": 0})

    runner = ProjectionRunner(store, [projection], page_size=3, poll_interval=0.01)
    await runner.start()
    stop = asyncio.Event()

    async def live_traffic() -> int:
        sent = 0
        while not stop.is_set():
            await deposit(store, f"acc-{sent % 7}", 1000)
            sent += 1
            await asyncio.sleep(0)
        return sent

    traffic = asyncio.create_task(live_traffic())
    try:
        report = await rebuild(store, projection, batch_size=16, catch_up_gap=4,
                               memory_limit=memory_limit)
        stop.set()
        sent = await traffic
        await until(lambda: caught_up(store, projection))
    finally:
        stop.set()
        await runner.stop()

    assert sent > 0 and report.position > 0
    rebuilt = await documents(store)
    assert rebuilt == await from_scratch(store, projection)
    assert sum(doc["deposits"] for doc in rebuilt.values()) == 200 + sent
    assert await documents(store, ACCOUNTS + "~rebuild") == {}


async def test_a_swap_fence_left_by_a_dead_rebuild_pauses_the_runner_then_is_broken(
    store: EventStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    projection = accounts()
    await deposit(store, "alice", 1)
    await catch_up(store, projection)
    generation = generation_name(projection.name)
    async with store.transaction() as uow:  # a rebuild fenced the runners off, then died
        uow.set_checkpoint(generation, fenced(0), expected=0)
    monkeypatch.setattr(projection_module, "FENCE_TIMEOUT_S", 0.5)
    runner = ProjectionRunner(store, [projection], poll_interval=0.01)
    await runner.start()
    try:
        await deposit(store, "alice", 2)

        async def paused() -> bool:
            return status_of(store, projection.name) == "paused"

        await until(paused)
        assert await documents(store) == {"alice": {"balance": 1, "deposits": 1}}
        await until(lambda: caught_up(store, projection))
    finally:
        await runner.stop()
    assert await documents(store) == {"alice": {"balance": 3, "deposits": 2}}
    assert await store.get_checkpoint(generation) == 1


@pytest.mark.parametrize("memory_limit", [IN_MEMORY, SPILLED], ids=["in_memory", "spilled"])
async def test_a_rebuild_with_no_live_runner_projects_up_to_the_head(
    store: EventStore, memory_limit: int,
) -> None:
    projection = accounts()
    await deposit(store, "alice", 1, 2, 3)
    await catch_up(store, projection)
    await deposit(store, "alice", 4)  # the service is down: nobody projected this one
    async with store.transaction() as uow:
        uow.delete_document(ACCOUNTS, "alice")

    seen: list[tuple[int, int]] = []
    report = await rebuild(store, projection, batch_size=2, memory_limit=memory_limit,
                           progress=lambda at, head: seen.append((at, head)))

    head = await store.last_position()
    assert (report.position, report.events) == (head, 4)
    assert seen[-1] == (head, head)
    assert await store.get_checkpoint(projection.checkpoint) == head
    assert await documents(store) == {"alice": {"balance": 10, "deposits": 4}}


@pytest.mark.parametrize("memory_limit", [IN_MEMORY, SPILLED], ids=["in_memory", "spilled"])
async def test_a_rebuild_removes_documents_no_event_makes_and_spills_past_its_limit(
    store: EventStore, memory_limit: int,
) -> None:
    projection = accounts()
    for n in range(6):
        await deposit(store, f"acc-{n}", n + 1)
    await catch_up(store, projection)
    async with store.transaction() as uow:  # a document no event accounts for
        uow.put_document(ACCOUNTS, "ghost", {"balance": 7, "deposits": 1})
    writes: list[int] = []
    commit = store.commit

    async def counted(operations: Sequence[Operation]) -> list[RecordedEvent]:
        writes.append(sum(isinstance(op, PutDocument) for op in operations))
        return await commit(operations)

    store.commit = counted  # type: ignore[method-assign]
    try:
        await rebuild(store, projection, batch_size=2, memory_limit=memory_limit)
    finally:
        store.commit = commit  # type: ignore[method-assign]

    assert await documents(store) == await from_scratch(store, projection)
    assert "ghost" not in await documents(store)
    assert await documents(store, ACCOUNTS + "~rebuild") == {}
    if memory_limit == IN_MEMORY:  # every document written once, by the swap
        assert [w for w in writes if w] == [6]
    else:  # written batch by batch into the shadow, the swap only moves them
        assert len([w for w in writes if w]) > 1


async def test_a_rebuild_that_fails_leaves_the_live_documents_and_the_collector_as_they_were(
    store: EventStore,
) -> None:
    await deposit(store, "alice", 10)
    await catch_up(store, accounts())
    await deposit(store, "alice", *range(1, 30), 666)
    before = await documents(store)

    with pytest.raises(RuntimeError, match="cannot be projected"):
        await rebuild(store, accounts(fail_on=666), batch_size=4)

    assert await documents(store) == before
    assert gc.get_freeze_count() == 0  # the rebuild's documents are collectable again
