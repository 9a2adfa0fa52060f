"""HTTP routes of the event store service: browse the log, replay, state as of a moment."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query

from magasin.api.paging import Cursor, Order, position_of
from magasin.eventstore.store import EventFilter, EventStore
from magasin.eventstore_service import history
from magasin.eventstore_service.replay import Replayer
from magasin.shared.errors import InvalidInput, NotFound
from magasin.shared.messages import RecordedEvent

AsOf = Annotated[
    datetime | None,
    Query(alias="asOf", description="ISO-8601 moment (UTC when no zone is given)."),
]
Version = Annotated[int | None, Query(ge=1, description="Stream version to rebuild.")]
PageSize = Annotated[int, Query(ge=1, le=1000, description="Events per page.")]


def event_json(event: RecordedEvent) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(event.to_json())
    return data


def router(store: EventStore) -> APIRouter:
    api = APIRouter(tags=["eventstore"])
    replayer = Replayer(store)

    @api.get("/api/events")
    async def list_events(
        stream_id: str | None = None,
        aggregate_type: Annotated[list[str] | None, Query(
            description="Aggregate type(s): `transaction`, `stock`, ...")] = None,
        event_type: Annotated[list[str] | None, Query(
            alias="type", description="Event type(s), e.g. `PaymentProcessed`.")] = None,
        correlation_id: str | None = None,
        since: Annotated[datetime | None, Query(
            alias="from", description="Occurred at or after (ISO-8601).")] = None,
        until: Annotated[datetime | None, Query(
            alias="to", description="Occurred at or before (ISO-8601).")] = None,
        after: Annotated[int, Query(ge=0, description="Global position to start after.")] = 0,
        before: Annotated[int | None, Query(
            ge=1, description="Only events below this global position.")] = None,
        cursor: Cursor = None,
        limit: PageSize = 100,
        order: Order = "asc",
    ) -> dict[str, Any]:
        """The log, filtered, in global position order (`order=desc`: newest first);
        `next_cursor` is the last position of the page (pass it as `cursor`; or as `after`,
        `before` when descending), null on the last page."""
        descending = order == "desc"
        if cursor is not None:
            position = position_of(cursor, await store.last_position())
            assert position is not None
            if descending:
                before = min(before or position, position)
            else:
                after = max(after, position)
        where = EventFilter(
            stream_id=stream_id,
            aggregates=tuple(aggregate_type or ()),
            types=tuple(event_type or ()),
            correlation_id=correlation_id,
            since=history.utc(since) if since else None,
            until=history.utc(until) if until else None,
        )
        events = await store.read_events(where, after=after, before=before, limit=limit + 1,
                                         descending=descending)
        more = len(events) > limit
        events = events[:limit]
        return {
            "items": [event_json(e) for e in events],
            "next_cursor": str(events[-1].global_position) if more else None,
        }

    @api.get("/api/events/{event_id}")
    async def get_event(event_id: Annotated[str, Path(max_length=100)]) -> dict[str, Any]:
        return event_json(await store.read_event(event_id))

    @api.get("/api/streams/{stream_id}")
    async def get_stream(
        stream_id: Annotated[str, Path(max_length=300)],
        from_version: Annotated[int, Query(ge=1)] = 1,
        to_version: Annotated[int | None, Query(ge=1)] = None,
        limit: PageSize = 1000,
    ) -> dict[str, Any]:
        """One stream's events in version order; `next_cursor` is the next `from_version`."""
        version = await store.stream_version(stream_id)
        if version == 0:
            raise NotFound(f"no stream {stream_id!r}")
        last = from_version + limit - 1
        if to_version is not None:
            last = min(last, to_version)
        events = await store.read_stream(stream_id, from_version=from_version, to_version=last)
        more = last < min(version, to_version or version)
        return {
            "stream_id": stream_id,
            "version": version,
            "items": [event_json(e) for e in events],
            "next_cursor": str(last + 1) if more else None,
        }

    @api.post("/api/replay/aggregate/{stream_id}")
    async def replay_aggregate(
        stream_id: Annotated[str, Path(max_length=300, description="e.g. `transaction-<id>`")],
        as_of: AsOf = None,
        version: Version = None,
    ) -> dict[str, Any]:
        """Rebuild one aggregate from its events, starting from its latest snapshot that
        fits, as of a version or a moment (else now). The rebuilt state is cached."""
        if as_of is not None and version is not None:
            raise InvalidInput("give asOf or version, not both")
        return await replayer.replay(
            stream_id, version=version, as_of=history.utc(as_of) if as_of else None
        )

    @api.get("/api/state")
    async def state(
        as_of: Annotated[datetime, Query(alias="asOf", description="ISO-8601 moment.")],
    ) -> dict[str, Any]:
        """What the read models showed at `asOf`: every transaction (status, totals) and
        every stock line, computed by replaying the log up to that moment."""
        return await history.state_as_of(store, history.utc(as_of))

    return api
