"""Conversions between stored rows and envelopes shared by the SQL adapters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from magasin.shared.messages import RecordedEvent

EVENT_COLUMNS = (
    "global_position, event_id, stream_id, stream_version, type, schema_version, "
    "occurred_at, correlation_id, causation_id, traceparent, metadata, payload"
)


def dumps(value: Mapping[str, Any]) -> str:
    return orjson.dumps(value).decode()


def event_from_row(row: Any, occurred_at: Any) -> RecordedEvent:
    """Build an envelope from a row laid out as EVENT_COLUMNS (occurred_at already decoded).

    Positional arguments in field order: this runs once per event read, keep it lean."""
    return RecordedEvent(
        str(row[1]), row[4], row[5], row[2], row[3], row[0], occurred_at,
        row[7], row[8], row[9], _loads(row[10]), _loads(row[11]),
    )


_loads = orjson.loads
