"""How far behind each projection is: events (head − checkpoint) and seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from magasin.eventstore.store import EventStore
from magasin.projections.projection import Projection
from magasin.projections.runner import position_of, running, status_of
from magasin.shared.clock import utcnow


@dataclass(frozen=True, slots=True)
class ProjectionLag:
    name: str
    checkpoint: int
    head: int
    lag_events: int
    """Events of the log past the checkpoint (head − checkpoint)."""
    lag_seconds: float
    """Age of the oldest event not projected yet; 0 when caught up."""
    status: str
    """running, caught_up, paused, failing, starting, or stopped (no runner in this process)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def lags(
    store: EventStore, projections: Sequence[Projection] | None = None
) -> list[ProjectionLag]:
    """The lag of `projections` (default: those a runner keeps up to date on `store` in
    this process), by name."""
    chosen = list(running(store).values()) if projections is None else list(projections)
    head = await store.last_position()
    now = utcnow()
    out: list[ProjectionLag] = []
    for projection in sorted(chosen, key=lambda p: p.name):
        # What this process's runner projected counts, though its checkpoint moves lazily.
        checkpoint = max(await store.get_checkpoint(projection.checkpoint),
                         position_of(store, projection.name))
        seconds = 0.0
        if checkpoint < head:
            oldest = await store.read_all(after=checkpoint, limit=1)
            if oldest:
                seconds = max(0.0, (now - oldest[0].occurred_at).total_seconds())
        out.append(
            ProjectionLag(
                name=projection.name, checkpoint=checkpoint, head=head,
                lag_events=max(0, head - checkpoint), lag_seconds=round(seconds, 3),
                status=status_of(store, projection.name) or "stopped",
            )
        )
    return out
