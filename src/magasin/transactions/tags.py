"""The routing tags a sale's events carry, so that a consumer meant for some sales only is
never delivered the others' events (issue 11, `messaging.tags`).

A tag is an entry of the events' `baggage` metadata, which every event a handler writes
inherits from the event it handles. `saga_index.save`, through which every sale is saved,
stamps the sale's own entries on the sale's events (from the sale, so that a step whose
unit of work starts afresh, an operator's or a deadline's decision, carries them too):

- `saga_mode=orchestration` (`ORCHESTRATED`): an orchestrated sale, from its
  TransactionCreated on. The orchestrator's consumer requires it; the services'
  choreographed reactions leave such events alone (`shared.commands.orchestrated`).
- `notify=webhook` (`WEBHOOK`): the sale has a callback_url. The notifier requires it.

A choreographed sale without a callback carries no baggage at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from magasin.eventstore.store import UnitOfWork
from magasin.messaging.tags import BAGGAGE, tag
from magasin.transactions.domain import Transaction
from magasin.transactions.orchestrator.routing import SAGA_MODE, Mode

NOTIFY = "notify"
ORCHESTRATED = tag(SAGA_MODE, Mode.ORCHESTRATION.value)
"""Carried by every event of an orchestrated sale."""
WEBHOOK = tag(NOTIFY, "webhook")
"""Carried by every event of a sale that has a callback_url (its final events included)."""


def baggage_of(sale: Transaction) -> dict[str, str]:
    """The sale's own baggage entries (empty for a choreographed sale with no callback)."""
    entries: dict[str, str] = {}
    if sale.saga_mode == Mode.ORCHESTRATION:
        entries[SAGA_MODE] = Mode.ORCHESTRATION.value
    if sale.callback_url:
        entries[NOTIFY] = "webhook"
    return entries


def with_baggage(metadata: Mapping[str, object], entries: Mapping[str, str]) -> dict[str, object]:
    """`metadata` whose baggage also has `entries` (those it had are kept)."""
    if not entries:
        return dict(metadata)
    old = metadata.get(BAGGAGE)
    baggage = {**(old if isinstance(old, Mapping) else {}), **entries}
    return {**metadata, BAGGAGE: baggage}


def add_baggage(uow: UnitOfWork, entries: Mapping[str, str]) -> None:
    """The events this unit of work records from now on carry `entries` in their baggage."""
    if entries:
        uow.causation = replace(
            uow.causation, metadata=with_baggage(uow.causation.metadata, entries))


def stamp(uow: UnitOfWork, sale: Transaction) -> None:
    """The sale's events recorded in this unit of work carry its tags."""
    add_baggage(uow, baggage_of(sale))
