"""Cursor pagination over documents listed in key order."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

from magasin.eventstore.store import EventStore

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
Cursor = Annotated[
    str | None, Query(description="`next_cursor` of the previous page; omit for the first.")
]
Order = Annotated[
    Literal["asc", "desc"],
    Query(description="`asc`: in key order; `desc`: the other way (ids in time order: newest "
                      "first)."),
]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


async def page_of(
    store: EventStore,
    collection: str,
    where: dict[str, str | int | bool],
    cursor: str | None,
    limit: int,
    order: str = "asc",
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of documents and the cursor of the next page (None on the last)."""
    rows = await store.find_documents(collection, where=where, after_key=cursor, limit=limit + 1,
                                      descending=order == "desc")
    more = len(rows) > limit
    rows = rows[:limit]
    return [body for _, body in rows], (rows[-1][0] if more and rows else None)
