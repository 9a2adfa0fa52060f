"""Which service answers which public path: the one table the gateway is rendered from.

Embedded mode serves every route on one port; in distributed mode each path below goes to
the processes of the service that owns it, so a client keeps one base URL and the same
paths. The test `tests/gateway/test_routing.py` checks this table against every route of
every service's app, through a real nginx.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVICES = ("transaction", "payment", "inventory", "store", "audit", "eventstore")
"""Every service of distributed mode (the same tuple as bootstrap.SERVICES, kept here so the
gateway imports no context)."""


@dataclass(frozen=True)
class Prefix:
    """`path` and everything under it (`path/...`) go to `service`; `stream`: its answers
    may be Server-Sent Events (never buffered, open up to the stream timeout)."""

    path: str
    service: str
    stream: bool = False


PREFIXES: tuple[Prefix, ...] = (
    Prefix("/api/transactions", "transaction"),
    Prefix("/api/sagas", "transaction"),
    # Every process answers these alike (they only check the caller's key).
    Prefix("/api/auth", "transaction"),
    # The operator console (pages, static files and its live feed of sales) is served by
    # magasin itself; in distributed mode by the transaction service, whose process sees
    # the sales as they change (transactions/feed.py).
    Prefix("/console", "transaction", stream=True),
    Prefix("/api/payments", "payment"),
    Prefix("/api/stock", "inventory"),
    Prefix("/api/reservations", "inventory"),
    Prefix("/api/stores", "store"),
    Prefix("/api/products", "store"),
    Prefix("/api/orders", "store"),
    Prefix("/api/audit", "audit"),
    Prefix("/api/events", "eventstore"),
    Prefix("/api/streams", "eventstore"),
    Prefix("/api/replay", "eventstore"),
    Prefix("/api/state", "eventstore"),
)


@dataclass(frozen=True)
class Stream:
    """A Server-Sent Events route (a regular expression of nginx): never buffered, and
    allowed to stay open for the stream timeout instead of the request timeout."""

    pattern: str
    service: str


STREAMS: tuple[Stream, ...] = (
    Stream(r"^/api/transactions/[^/]+/events$", "transaction"),
    Stream(r"^/api/transactions/live$", "transaction"),
)

FANOUT = ("/health", "/api/projections", "/api/dead-letters", "/openapi.json")
"""Paths every service answers for its own part (its health, its read models, the dead
letters of its consumers, its routes): the gateway asks each service and merges the
answers into the one embedded mode gives (deploy/gateway's njs script)."""


def consumer_service(consumer: str) -> str | None:
    """The service that runs `consumer`: consumers are named after their service
    (`transaction`, `transaction.notifier`, ...), and a dead letter's id starts with its
    consumer (`<consumer>:<message id>`), so the gateway routes both by this rule."""
    head = consumer.split(":", 1)[0].split(".", 1)[0]
    return head if head in SERVICES else None
