"""Every projection of every service, by name (`<service>.<read model>`), for the CLI."""

from __future__ import annotations

from magasin.projections.projection import Projection


def all_projections() -> dict[str, Projection]:
    # Imported here: the framework does not depend on the contexts, only this list does.
    from magasin.inventory.projection import reservations_projection, stock_projection
    from magasin.payments.projection import projection as payments_projection
    from magasin.stores.projection import (
        orders_projection,
        products_projection,
        stores_projection,
    )
    from magasin.transactions.projection import projection as transactions_projection

    found = [
        transactions_projection(), payments_projection(), stock_projection(),
        reservations_projection(), stores_projection(), products_projection(),
        orders_projection(),
    ]
    return {p.name: p for p in found}


def service_of(name: str) -> str:
    """The service owning a projection (its log holds the events), from its name."""
    return name.partition(".")[0]
