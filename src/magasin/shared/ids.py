"""Identifiers: event ids are UUIDs (text form); stream ids are `<aggregate>-<id>`."""

from __future__ import annotations

import os
import time
import uuid

_POOL_BYTES = 4096
_pool = b""
_taken = 0


def _forget_pool() -> None:
    """A forked child must not hand out the ids its parent will."""
    global _pool, _taken
    _pool, _taken = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def hex_id() -> str:
    """A random UUID (version 4) as 32 hex digits, `uuid.uuid4().hex`'s form. The randomness
    is read from the OS 4 KiB at a time: `uuid.uuid4()` makes one getrandom call per id,
    which profiles showed on the hot path of a sale (issue 11)."""
    global _pool, _taken
    if _taken >= len(_pool):
        _pool, _taken = os.urandom(_POOL_BYTES), 0
    bits = int.from_bytes(_pool[_taken:_taken + 16])
    _taken += 16
    bits = bits & ~(0xF000 << 64) | 0x4000 << 64  # version 4
    bits = bits & ~(0xC000 << 48) | 0x8000 << 48  # RFC 9562 variant
    return f"{bits:032x}"


def new_id() -> str:
    """A random UUID (version 4), text form (see hex_id)."""
    h = hex_id()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
