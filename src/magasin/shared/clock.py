"""Time in one place: UTC-aware datetimes and conversions used by storage adapters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_micros(moment: datetime) -> int:
    """Microseconds since the epoch, exact (no float rounding)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: magasin only stores UTC-aware times")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(0, 0, micros)  # positional: a third cheaper than by keyword
