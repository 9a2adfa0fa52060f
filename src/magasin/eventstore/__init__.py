"""The event store: an append-only log of streams with a gap-safe global order."""

from magasin.eventstore.store import ANY, NO_STREAM, Causation, EventStore, Snapshot, UnitOfWork

__all__ = ["ANY", "NO_STREAM", "Causation", "EventStore", "Snapshot", "UnitOfWork"]
