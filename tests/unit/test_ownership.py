"""Partition ownership among the processes of a service (leases in the event store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.messaging.ownership import Ownership, assignment, leases, plan_all


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    store = SqliteEventStore(tmp_path / "owners.db")
    await store.open()
    yield store
    await store.close()


def test_members_take_the_partitions_in_turn() -> None:
    assert assignment(["b", "a"], 4) == {0: "a", 1: "b", 2: "a", 3: "b"}
    assert assignment(["a"], 3) == {0: "a", 1: "a", 2: "a"}
    assert assignment([], 3) == {}


async def tick(*members: Ownership) -> None:
    for member in members:
        _, release = await member.plan()
        for partition in release:  # drained at once
            await member.released(partition)


async def test_two_processes_share_four_partitions_and_a_survivor_takes_them_all(
    store: SqliteEventStore,
) -> None:
    clock = Clock()
    a = Ownership(store, "ns.carts", 4, member="a", lease=3.0, clock=clock)
    b = Ownership(store, "ns.carts", 4, member="b", lease=3.0, clock=clock)
    acquired, _ = await a.plan()
    assert acquired == {0, 1, 2, 3}  # alone at first
    for _ in range(2):
        await tick(a, b)
    assert (a.owned, b.owned) == ({0, 2}, {1, 3})
    assert [lease.owner for lease in await leases(store, "ns.carts", clock.now)] == \
        ["a", "b", "a", "b"]

    clock.now += 1.0
    await tick(b)  # a died: its member and leases expire after 3 s
    assert b.owned == {1, 3}
    clock.now += 3.0
    await tick(b)
    assert b.owned == {0, 1, 2, 3}

    again = Ownership(store, "ns.carts", 4, member="a", lease=3.0, clock=clock)
    for _ in range(2):
        await tick(again, b)
    assert (again.owned, b.owned) == ({0, 2}, {1, 3})


async def test_a_partition_is_not_taken_while_its_owner_still_drains_it(
    store: SqliteEventStore,
) -> None:
    clock = Clock()
    a = Ownership(store, "g", 2, member="a", clock=clock)
    b = Ownership(store, "g", 2, member="b", clock=clock)
    await a.plan()
    await b.plan()  # b joins: partition 1 is b's, but a holds it
    _, release = await a.plan()
    assert release == {1}
    acquired, _ = await b.plan()
    assert acquired == set()  # a drains it: still leased (renewed) to a
    clock.now += 2.0
    await a.plan()
    clock.now += 2.0
    assert (await b.plan())[0] == set()
    await a.released(1)
    assert (await b.plan())[0] == {1}


async def test_a_clean_leave_frees_everything_at_once(store: SqliteEventStore) -> None:
    clock = Clock()
    a = Ownership(store, "g", 4, member="a", clock=clock)
    b = Ownership(store, "g", 4, member="b", clock=clock)
    await tick(a, b, a, b)
    await a.leave()
    await tick(b)
    assert b.owned == {0, 1, 2, 3}


async def test_a_process_renews_all_its_groups_in_one_unit_of_work(
    store: SqliteEventStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    carts = [Ownership(store, "ns.carts", 2, member=m, clock=clock) for m in ("a", "b")]
    orders = [Ownership(store, "ns.orders", 2, member=m, clock=clock) for m in ("a", "b")]
    commits = 0
    commit = store.commit

    async def counted(operations: Any) -> Any:
        nonlocal commits
        commits += 1
        return await commit(operations)

    monkeypatch.setattr(store, "commit", counted)
    for _ in range(3):
        for member in (0, 1):
            before = commits
            plans = await plan_all([carts[member], orders[member]])
            assert commits == before + 1  # one a tick, whatever the process's groups
            for ownership, (_, release) in zip((carts[member], orders[member]), plans,
                                               strict=True):
                for partition in release:  # drained at once
                    await ownership.released(partition)
    assert [(c.owned, o.owned) for c, o in zip(carts, orders, strict=True)] == \
        [({0}, {0}), ({1}, {1})]
