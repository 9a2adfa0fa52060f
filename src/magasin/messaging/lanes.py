"""N lanes for the in-process bus (issue 12): one key stays ordered, lanes run concurrently.

A job goes to lane `partition_of(key, N)`; each lane runs its jobs one at a time in
submission order, so the events of one key are handled in publish order while jobs
of keys in other lanes proceed at the same time. Not yet wired into the bus.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from magasin.messaging.partitioning import partition_of

Job = Callable[[], Awaitable[None]]


class Lanes:
    def __init__(self, partitions: int) -> None:
        self._queues: list[asyncio.Queue[Job | None]] = [asyncio.Queue() for _ in range(partitions)]
        self._workers = [asyncio.create_task(self._run(q)) for q in self._queues]
        self._errors: list[BaseException] = []

    @property
    def partitions(self) -> int:
        return len(self._queues)

    def submit(self, key: str, job: Job) -> int:
        lane = partition_of(key, len(self._queues))
        self._queues[lane].put_nowait(job)
        return lane

    async def drain(self) -> None:
        """Wait until every submitted job has run; re-raise the first failure."""
        await asyncio.gather(*(q.join() for q in self._queues))
        if self._errors:
            raise self._errors[0]

    async def close(self) -> None:
        for q in self._queues:
            q.put_nowait(None)
        await asyncio.gather(*self._workers)

    async def _run(self, queue: asyncio.Queue[Job | None]) -> None:
        while True:
            job = await queue.get()
            try:
                if job is None:
                    return
                await job()
            except Exception as exc:  # kept for drain(); the lane goes on with the next job
                self._errors.append(exc)
            finally:
                queue.task_done()
