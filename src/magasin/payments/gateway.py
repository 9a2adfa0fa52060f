"""The bank behind a port, and the in-memory simulator that stands for it.

    BankGateway.charge / refund
        └── raises Unavailable when the bank cannot be reached (the caller retries with the
            same idempotency key, which never takes the money twice)
"""

from __future__ import annotations

import asyncio
import random
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from magasin.shared.errors import BusinessRuleViolation, Conflict, Unavailable

FAILING_METHOD = "FAIL_CARD"
LIMIT_CENTS = 1_000_000
"""The bank declines any charge over 10000.00 (amounts are in cents)."""


@dataclass(frozen=True, slots=True)
class Charge:
    """The bank's answer to a charge: approved with a reference, or declined with a reason."""

    approved: bool
    reference: str
    decline_reason: str | None = None


class BankGateway(ABC):
    """Port of the bank. Both calls are idempotent per key: a retry gets the first answer."""

    @abstractmethod
    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        """Take `amount` cents; a refusal is a declined Charge, not an exception."""

    @abstractmethod
    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        """Give back `amount` cents of the charge `reference`; returns the refund reference.

        Refusals (unknown or already refunded charge, amount over the charge) raise
        BusinessRuleViolation.
        """


@dataclass(frozen=True, slots=True)
class _ChargeRequest:
    amount: int
    currency: str
    method: str


@dataclass(frozen=True, slots=True)
class _Refund:
    reference: str
    charge_reference: str
    amount: int


class BankSimulator(BankGateway):
    """An in-memory bank with the original system's rules.

    Declines payment method FAIL_CARD (`declined`), amounts over 10000.00
    (`limit_exceeded`), non-positive amounts (`invalid_amount`) and a seeded random share
    `decline_rate` of the rest (`declined`). Each call waits `latency_s`. Set `reachable`
    to False to simulate an outage: every call then raises Unavailable.
    """

    def __init__(
        self, latency_s: float = 0.1, decline_rate: float = 0.0, seed: int | None = None
    ) -> None:
        if latency_s < 0:
            raise ValueError("latency_s must be >= 0")
        if not 0.0 <= decline_rate <= 1.0:
            raise ValueError("decline_rate must be within [0, 1]")
        self.latency_s = latency_s
        self.decline_rate = decline_rate
        self.reachable = True
        self._rng = random.Random(seed)
        self._charges: dict[str, tuple[_ChargeRequest, Charge]] = {}
        self._captured: dict[str, int] = {}
        """Approved charges still holding money: bank reference -> amount."""
        self._refunds: dict[str, _Refund] = {}
        self._refunded: set[str] = set()

    @property
    def charges(self) -> list[Charge]:
        """Every distinct charge the bank decided on (approved or not), in order."""
        return [charge for _, charge in self._charges.values()]

    @property
    def captured_total(self) -> int:
        """Cents taken and not given back."""
        refunded = sum(refund.amount for refund in self._refunds.values())
        return sum(self._captured.values()) - refunded

    @property
    def refunds(self) -> list[str]:
        """References of the refunds made, in order."""
        return [refund.reference for refund in self._refunds.values()]

    async def charge(
        self, idempotency_key: str, amount: int, currency: str, method: str
    ) -> Charge:
        await self._call()
        # No await from here on: check-and-record is atomic for concurrent callers.
        request = _ChargeRequest(amount, currency, method)
        known = self._charges.get(idempotency_key)
        if known is not None:
            if known[0] != request:
                raise Conflict(
                    f"idempotency key {idempotency_key!r} was used for a different charge"
                )
            return known[1]
        reference = f"CH-{uuid.uuid4().hex[:16].upper()}"
        reason = self._decline_reason(amount, method)
        charge = Charge(approved=reason is None, reference=reference, decline_reason=reason)
        self._charges[idempotency_key] = (request, charge)
        if charge.approved:
            self._captured[reference] = amount
        return charge

    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        await self._call()
        known = self._refunds.get(idempotency_key)
        if known is not None:
            if (known.charge_reference, known.amount) != (reference, amount):
                raise Conflict(
                    f"idempotency key {idempotency_key!r} was used for a different refund"
                )
            return known.reference
        captured = self._captured.get(reference)
        if captured is None:
            raise BusinessRuleViolation(f"no captured charge {reference!r} to refund")
        if reference in self._refunded:
            raise BusinessRuleViolation(f"charge {reference!r} is already refunded")
        if not 0 < amount <= captured:
            raise BusinessRuleViolation(
                f"refund of {amount} cents is not within the {captured} cents charged"
            )
        refund = _Refund(f"RF-{uuid.uuid4().hex[:16].upper()}", reference, amount)
        self._refunds[idempotency_key] = refund
        self._refunded.add(reference)
        return refund.reference

    async def _call(self) -> None:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if not self.reachable:
            raise Unavailable("the bank cannot be reached")

    def _decline_reason(self, amount: int, method: str) -> str | None:
        if method == FAILING_METHOD:
            return "declined"
        if amount <= 0:
            return "invalid_amount"
        if amount > LIMIT_CENTS:
            return "limit_exceeded"
        if self.decline_rate > 0 and self._rng.random() < self.decline_rate:
            return "declined"
        return None
