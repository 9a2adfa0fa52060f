"""Replay of one aggregate (seed 6.4.1): rebuilt from its latest fitting snapshot and the
events after it, as of a version or a moment, and kept in a cache keyed by (stream, version)."""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Any

from magasin.eventstore.store import EventStore
from magasin.eventstore_service.aggregates import repository
from magasin.shared.errors import NotFound
from magasin.shared.ids import aggregate_of

CACHE_SIZE = 1000


class Replayer:
    """Rebuilds aggregates of one store. A stream's past versions never change, so a state
    cached for (stream, version) stays right forever; the cache only bounds memory."""

    def __init__(self, store: EventStore, cache_size: int = CACHE_SIZE) -> None:
        self.store = store
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    async def replay(
        self, stream_id: str, *, version: int | None = None, as_of: datetime | None = None
    ) -> dict[str, Any]:
        """The aggregate of `stream_id` at `version`, or as of `as_of`, or now."""
        aggregate_type = aggregate_of(stream_id)
        repo = repository(aggregate_type)
        ident = stream_id[len(aggregate_type) + 1:]
        if not ident:
            raise NotFound(f"no stream {stream_id!r}")
        if as_of is None:
            current = await self.store.stream_version(stream_id)
            if current == 0:
                raise NotFound(f"no stream {stream_id!r}")
            if version is not None and version > current:
                raise NotFound(f"stream {stream_id!r} is at version {current}, not {version}")
            hit = self._cache.get((stream_id, version or current))
            if hit is not None:
                self._cache.move_to_end((stream_id, version or current))
                return {**hit, "as_of": None, "cached": True}
        rebuilt = await repo.rebuild(self.store, ident, version=version, until=as_of)
        if rebuilt is None:
            raise NotFound(f"stream {stream_id!r} had no event by {as_of}")
        aggregate = rebuilt.aggregate
        body = {
            "stream_id": stream_id,
            "aggregate_type": aggregate_type,
            "id": ident,
            "version": aggregate.version,
            "from_snapshot": rebuilt.snapshot_version,
            "events_replayed": rebuilt.events_replayed,
            "state": aggregate.state(),
        }
        self._cache[stream_id, aggregate.version] = body
        self._cache.move_to_end((stream_id, aggregate.version))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return {**body, "as_of": as_of.isoformat() if as_of else None, "cached": False}
