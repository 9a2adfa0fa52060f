"""Cursor pagination over documents listed in key order.

A cursor is opaque to clients: the last key of the page, base64url-encoded, and a check
over that key and the list it pages (`scope`). A cursor that was not handed out by that
list (garbled, truncated, made up, or taken from another list) answers `400 invalid_input`
rather than an empty page that looks like the end of the list. The check is not a secret:
cursors only say where to go on, so a forged one reveals nothing; it catches mistakes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel

from magasin.eventstore.store import EventStore
from magasin.shared.errors import InvalidInput

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


MAX_CURSOR = 1000
"""Longer cursors are refused without decoding (keys are ids, far shorter)."""


def _check(scope: str, key: str) -> str:
    return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()[:16]


def cursor_of(scope: str, key: str | None) -> str | None:
    """The cursor a client gets for the page after `key` of the list `scope`."""
    if key is None:
        return None
    encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    return f"{encoded}.{_check(scope, key)}"


def key_of(scope: str, cursor: str | None) -> str | None:
    """The key a cursor of the list `scope` stands for; InvalidInput if it is not one."""
    if cursor is None:
        return None
    encoded, dot, check = cursor.partition(".")
    try:
        if len(cursor) > MAX_CURSOR or not dot:
            raise ValueError
        key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        key = None
    if key is None or check != _check(scope, key):
        raise InvalidInput(
            "unknown cursor: pass the `next_cursor` of the previous page of this same list"
        )
    return key


def position_of(cursor: str | None, last: int) -> int | None:
    """The position a cursor of a log stands for (logs page by position, a number the
    client may also pass as `after`); InvalidInput unless it is one of the log's positions
    (0..`last`, the log's current end)."""
    if cursor is None:
        return None
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 19 or int(cursor) > last:
        raise InvalidInput(f"unknown cursor {cursor[:40]!r}: pass the `next_cursor` of the "
                           "previous page")
    return int(cursor)


async def page_of(
    store: EventStore,
    collection: str,
    where: dict[str, str | int | bool],
    cursor: str | None,
    limit: int,
    order: str = "asc",
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of documents and the cursor of the next page (None on the last); the
    cursors are those of the list `collection` (see key_of)."""
    rows = await store.find_documents(collection, where=where,
                                      after_key=key_of(collection, cursor), limit=limit + 1,
                                      descending=order == "desc")
    more = len(rows) > limit
    rows = rows[:limit]
    return [body for _, body in rows], cursor_of(collection, rows[-1][0] if more and rows else None)
