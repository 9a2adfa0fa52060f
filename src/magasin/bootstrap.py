"""Composition root: the only place that picks adapters for a runtime mode."""

from __future__ import annotations

from magasin.config import Settings
from magasin.eventstore.sqlite import SqliteEventStore, Synchronous
from magasin.eventstore.store import EventStore
from magasin.messaging.bus import RetryPolicy


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        attempts=settings.retry_attempts,
        initial_delay=settings.retry_initial_delay,
        multiplier=settings.retry_multiplier,
    )


def embedded_store(settings: Settings) -> EventStore:
    """Embedded mode: one SQLite file; its log is also the bus, so no outbox."""
    sync: Synchronous = settings.sqlite_synchronous  # type: ignore[assignment]
    return SqliteEventStore(settings.sqlite_path, synchronous=sync)


def distributed_store(settings: Settings) -> EventStore:
    """Distributed mode: PostgreSQL with an outbox that a relay publishes to RabbitMQ."""
    from magasin.eventstore.postgres import PostgresEventStore

    return PostgresEventStore(
        settings.database_url, schema=settings.database_schema, outbox=True
    )
