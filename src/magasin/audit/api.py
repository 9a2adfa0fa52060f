"""HTTP API of the audit service: a transaction's trail, a filtered range (JSON or CSV),
and the verification of the whole chain."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from magasin.api.paging import Cursor, Limit, position_of
from magasin.audit import log
from magasin.eventstore.store import EventStore
from magasin.shared.errors import InvalidInput

CSV_COLUMNS = (
    "sequence", "occurred_at", "event_type", "event_id", "stream_id", "stream_version",
    "correlation_id", "causation_id", "service", "scopes", "payload", "prev_hash", "hash",
)


class Entry(BaseModel):
    sequence: int
    event_id: str
    event_type: str
    stream_id: str
    stream_version: int
    occurred_at: str
    correlation_id: str | None
    causation_id: str | None
    service: str
    scopes: list[str]
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class EntryPage(BaseModel):
    items: list[Entry]
    next_cursor: str | None


class Problem(BaseModel):
    sequence: int
    kind: str
    detail: str
    event_id: str | None


class Verification(BaseModel):
    ok: bool
    checked: int
    head: int
    problems: list[Problem]


def _matches(
    entry: dict[str, Any], start: datetime | None, end: datetime | None, types: set[str]
) -> bool:
    if types and entry["event_type"] not in types:
        return False
    if start is None and end is None:
        return True
    at = datetime.fromisoformat(entry["occurred_at"])
    return (start is None or at >= start) and (end is None or at < end)


async def _select(
    store: EventStore, after: int, start: datetime | None, end: datetime | None,
    types: set[str], limit: int | None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Matching entries after sequence `after`, at most `limit`; and the cursor after the
    last one returned when more may follow."""
    found: list[dict[str, Any]] = []
    async for page in log.entries(store, after=after):
        for _, entry in page:
            if _matches(entry, start, end, types):
                if limit is not None and len(found) == limit:
                    return found, int(found[-1]["sequence"])
                found.append(entry)
    return found, None


def _csv(rows: list[dict[str, Any]]) -> AsyncIterator[str]:
    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([
                ";".join(row[c]) if c == "scopes"
                else orjson.dumps(row[c]).decode() if c == "payload"
                else "" if row[c] is None else row[c]
                for c in CSV_COLUMNS
            ])
            if buffer.tell() > 64_000:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    return lines()


def router(store: EventStore) -> APIRouter:
    api = APIRouter(prefix="/api/audit", tags=["audit"])

    @api.get("/trail/{correlation_id}", response_model=list[Entry])
    async def get_trail(correlation_id: str) -> list[dict[str, Any]]:
        """Every audited event of one transaction (its correlation id), in order."""
        return await log.trail(store, correlation_id)

    @api.get(
        "", response_model=EntryPage,
        responses={200: {"content": {"text/csv": {}},
                         "description": "JSON page, or with `Accept: text/csv` (or "
                                        "`format=csv`) every matching entry as CSV."}},
    )
    async def list_entries(
        start: Annotated[datetime | None, Query(alias="from",
                                                description="Occurred at or after.")] = None,
        end: Annotated[datetime | None, Query(alias="to", description="Occurred before.")] = None,
        type_: Annotated[list[str] | None, Query(alias="type", description="Event types.")] = None,
        format_: Annotated[str | None, Query(alias="format", pattern="^(json|csv)$")] = None,
        accept: Annotated[str | None, Header()] = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Any:
        """Audit entries in chain order, filtered by time range and event type."""
        for moment in (start, end):
            if moment is not None and moment.tzinfo is None:
                raise InvalidInput("from/to need a time zone (e.g. 2026-01-01T00:00:00Z)")
        after = position_of(cursor, await log.length(store)) or 0
        types = set(type_ or ())
        as_csv = format_ == "csv" or (format_ is None and "text/csv" in (accept or ""))
        if as_csv:
            rows, _ = await _select(store, after, start, end, types, None)
            return StreamingResponse(
                _csv(rows), media_type="text/csv",
                headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
            )
        items, next_after = await _select(store, after, start, end, types, limit)
        return {"items": items, "next_cursor": None if next_after is None else str(next_after)}

    @api.get("/verify", response_model=Verification)
    async def verify_chain() -> dict[str, Any]:
        """Recompute the hash chain; `ok` is false and `problems` say where if any entry was
        modified or deleted."""
        return await log.verify(store)

    return api
