"""Documents of the transaction service: the read model (a projection, see projection.py)
and the catalog replica (write-side state: prices for new sales, kept by a bus consumer)."""

from __future__ import annotations

from magasin.transactions.projection import TRANSACTIONS

PRODUCTS = "transaction.products"
STORES = "transaction.stores"

__all__ = ["PRODUCTS", "STORES", "TRANSACTIONS"]
