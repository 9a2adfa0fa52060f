"""Identifiers: event ids are UUIDs (text form); stream ids are `<aggregate>-<id>`."""

from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    return str(uuid.uuid4())


def time_ordered_id() -> str:
    """A UUIDv7 (RFC 9562): ids created later sort after, so keys list in creation order."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 66 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    return str(uuid.UUID(int=value))


def stream_id(aggregate: str, ident: str) -> str:
    if not aggregate or "-" in aggregate:
        raise ValueError(f"aggregate name {aggregate!r} must be non-empty and without '-'")
    return f"{aggregate}-{ident}"


def aggregate_of(stream: str) -> str:
    return stream.split("-", 1)[0]
