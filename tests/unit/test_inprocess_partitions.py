"""The in-process bus's lanes when N changes: nothing lost, nothing reordered, once each."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.messaging import inprocess
from magasin.messaging.inprocess import InProcessBus
from magasin.shared.messages import NewEvent
from tests.contracts.test_event_bus import (
    SCHEMAS,
    KeyedLog,
    _count,
    effects,
    eventually,
    keyed_burst,
    keyed_effects,
)


async def test_changing_the_number_of_lanes_loses_and_reorders_nothing(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "bus.db")
    await store.open()
    handled = KeyedLog()
    burst = await keyed_burst(store, keys=16, per_key=20)
    try:
        # Stopped part way with 4 lanes (some ahead of others), resumed with 2, then 7.
        for partitions, reached in ((4, 80), (2, 200), (7, len(burst))):
            bus = InProcessBus(store, SCHEMAS, poll_interval=0.05, partitions=partitions)
            bus.subscribe("carts", {"ItemAdded": handled})
            await bus.start()
            await eventually(lambda n=reached: _count(store, n))
            await bus.stop(grace=0.01)
            assert await store.get_document("bus.lanes", "carts") is not None
        await asyncio.sleep(0.1)
        assert await keyed_effects(store) == {
            f"customer-{k}": list(range(20)) for k in range(16)}
    finally:
        await store.close()


async def test_a_consumer_from_before_lanes_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "bus.db")
    await store.open()
    handled = KeyedLog()
    burst = await keyed_burst(store, keys=3, per_key=4)
    async with store.transaction() as uow:  # handled by a bus without lanes
        uow.set_checkpoint("bus:carts", burst[5].global_position)
    bus = InProcessBus(store, SCHEMAS, poll_interval=0.05, partitions=4)
    bus.subscribe("carts", {"ItemAdded": handled})
    await bus.start()
    try:
        await eventually(lambda: _count(store, len(burst) - 6))
        await asyncio.sleep(0.2)
        assert len(await effects(store)) == len(burst) - 6
        assert await bus.lane_positions("carts") == [burst[-1].global_position] * 4
    finally:
        await bus.stop()
        await store.close()


async def test_a_lane_moves_over_the_events_it_ignores_once_the_log_is_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not at every poll while the log keeps moving: that was a commit of its own per lane
    and poll, for a replay of ignored events after a crash that costs nothing."""
    store = SqliteEventStore(tmp_path / "bus.db")
    await store.open()
    moves: list[int] = []
    real = InProcessBus._save_checkpoint

    async def counted(bus: InProcessBus, lane: inprocess._Lane, position: int) -> None:
        moves.append(position)
        await real(bus, lane, position)

    monkeypatch.setattr(InProcessBus, "_save_checkpoint", counted)
    bus = InProcessBus(store, SCHEMAS, poll_interval=0.3, partitions=1)
    bus.subscribe("carts", {"ItemAdded": KeyedLog()})
    await bus.start()
    try:
        await eventually(lambda: store.get_document("bus.lanes", "carts"))
        ends = time.monotonic() + 1.5  # five polls of events the consumer ignores
        while time.monotonic() < ends:
            await store.append(f"cart-{time.monotonic_ns()}",
                               [NewEvent("CartClosed", {"reason": "idle"})])
            await asyncio.sleep(0.02)
        assert moves == []
        # Nothing waits for the lane once it has read them, moved or not.
        await eventually(lambda: _depths(bus, [0]))
        assert moves == []
        head = await store.last_position()
        await eventually(lambda: _at(bus, head))  # quiet for a poll: it moves, once
        assert moves == [head]
    finally:
        await bus.stop()
        await store.close()


async def _at(bus: InProcessBus, position: int) -> bool:
    return await bus.lane_positions("carts") == [position]


async def _depths(bus: InProcessBus, expected: list[int]) -> bool:
    return [state.depth for state in await bus.partition_states()] == expected
