"""Identifiers: event ids are UUIDs (text form); stream ids are `<aggregate>-<id>`."""

from __future__ import annotations

import uuid


def new_id() -> str:
    return str(uuid.uuid4())


def stream_id(aggregate: str, ident: str) -> str:
    if not aggregate or "-" in aggregate:
        raise ValueError(f"aggregate name {aggregate!r} must be non-empty and without '-'")
    return f"{aggregate}-{ident}"


def aggregate_of(stream: str) -> str:
    return stream.split("-", 1)[0]
