"""Identifiers: event ids are UUIDs (text form); stream ids are `<aggregate>-<id>`."""

from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    return str(uuid.uuid4())


_last_payload = 0


def time_ordered_id() -> str:
    """A UUIDv7 (RFC 9562): ids created later in this process sort after, within one
    millisecond too, so keys list in creation order."""
    global _last_payload
    # 48 bits of milliseconds then 74 random bits; within one millisecond the random part
    # counts up from the last id instead, which keeps the order (RFC 9562 §6.2, method 2).
    payload = (time.time_ns() // 1_000_000) << 74 | int.from_bytes(os.urandom(10)) >> 6
    payload = _last_payload = max(payload, _last_payload + 1)
    millis, rand_a, rand_b = payload >> 74, payload >> 62 & 0xFFF, payload & (1 << 62) - 1
    return str(uuid.UUID(int=millis << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b))


def stream_id(aggregate: str, ident: str) -> str:
    if not aggregate or "-" in aggregate:
        raise ValueError(f"aggregate name {aggregate!r} must be non-empty and without '-'")
    return f"{aggregate}-{ident}"


def aggregate_of(stream: str) -> str:
    return stream.split("-", 1)[0]
