"""What a bounded context hands the composition root: its consumers, routes and loops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from magasin.config import Settings
from magasin.eventstore.store import EventStore
from magasin.messaging.bus import Handler, RetryPolicy

if TYPE_CHECKING:
    from fastapi import APIRouter

    from magasin.projections import Projection


@dataclass(frozen=True)
class ServiceContext:
    """What a context needs to build itself: its store and the settings."""

    store: EventStore
    settings: Settings
    mode: str = "embedded"
    """`embedded` (every service shares one log) or `distributed` (each has its own)."""


@dataclass(frozen=True)
class Service:
    """One bounded context, ready to run in either mode.

    `consumers` maps a consumer name (unique across services, e.g. `payment`) to its
    explicit registry `{event type: handler}`; `loops` are background coroutines (an expiry
    sweeper, say) started with the service and cancelled when it stops; `on_stop` closes
    what the service opened (an HTTP client, say); `projections` are its read models, kept
    up to date from its own event log in both modes.
    """

    name: str
    consumers: Mapping[str, Mapping[str, Handler]]
    router: APIRouter | None = None
    loops: Sequence[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=tuple)
    on_stop: Sequence[Callable[[], Awaitable[None]]] = field(default_factory=tuple)
    projections: Sequence[Projection] = field(default_factory=tuple)
    retry: Mapping[str, RetryPolicy] = field(default_factory=dict)
    """Retry policies of consumers that need another than the runtime's (by consumer)."""
    concurrency: Mapping[str, int] = field(default_factory=dict)
    """Consumers whose handlers wait on an outside system, and how many events each may
    handle at once (see EventBus.subscribe)."""
    requires: Mapping[str, str] = field(default_factory=dict)
    """Consumers meant only for the events carrying a routing tag, and the tag (see
    `messaging.tags`): the bus never delivers them the others."""
    whole_log: frozenset[str] = frozenset()
    """Consumers of every event, off every sale's path (an archive, an audit): they get
    the events in the batches the relays ship (see EventBus.subscribe)."""
    health: Callable[[], Mapping[str, Any]] | None = None
    """Details `/health` shows under `checks.<service>` (a circuit breaker's state, say)."""
