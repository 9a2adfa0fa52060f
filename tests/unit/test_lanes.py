"""In-process lanes: per-key order holds, and a key in another lane is not held up."""

from __future__ import annotations

import asyncio

from magasin.messaging.lanes import Job, Lanes
from magasin.messaging.partitioning import partition_of


async def test_each_key_is_handled_in_submission_order() -> None:
    lanes = Lanes(4)
    seen: dict[str, list[int]] = {}

    def job(key: str, n: int) -> Job:
        async def run() -> None:
            await asyncio.sleep(0)
            seen.setdefault(key, []).append(n)
        return run

    for n in range(50):
        for k in range(20):
            lanes.submit(f"cust-{k}", job(f"cust-{k}", n))
    await lanes.drain()
    await lanes.close()
    assert seen == {f"cust-{k}": list(range(50)) for k in range(20)}


async def test_a_blocked_lane_does_not_hold_up_another_lane() -> None:
    lanes = Lanes(4)
    a = "cust-a"
    b = next(f"cust-{i}" for i in range(100) if partition_of(f"cust-{i}", 4) != partition_of(a, 4))
    released = asyncio.Event()

    async def waits_for_b() -> None:
        await released.wait()

    async def releases() -> None:
        released.set()

    lanes.submit(a, waits_for_b)
    lanes.submit(b, releases)  # would never run if lanes were one queue: drain would hang
    await asyncio.wait_for(lanes.drain(), 10)
    await lanes.close()
