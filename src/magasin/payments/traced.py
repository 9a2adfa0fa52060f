"""The bank port with a tracing span around each call (see observability.tracing)."""

from __future__ import annotations

from typing import Any

from magasin.observability.tracing import span
from magasin.payments.gateway import BankGateway, BankRecord, Charge


class TracedBank(BankGateway):
    """The bank port with a span around each call."""

    def __init__(self, bank: BankGateway) -> None:
        self.bank = bank

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bank, name)  # the wrapped gateway's own extras (state, stats)

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        with span("bank charge", {"magasin.transaction_id": idempotency_key,
                                  "magasin.amount": amount}):
            return await self.bank.charge(idempotency_key, amount, currency, method)

    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        with span("bank refund", {"magasin.refund_key": idempotency_key,
                                  "magasin.amount": amount}):
            return await self.bank.refund(idempotency_key, reference, amount)

    async def lookup(self, idempotency_key: str) -> BankRecord | None:
        with span("bank lookup", {"magasin.idempotency_key": idempotency_key}):
            return await self.bank.lookup(idempotency_key)
