"""The bank behind a port, and the simulator that stands for it.

    BankGateway.charge / refund / lookup
        └── raises Unavailable when the bank cannot be reached (the caller retries with the
            same idempotency key, which never takes the money twice)

`lookup` is the bank's side of reconciliation (`payments/reconcile.py`): what the bank
recorded for a charge's idempotency key (the transaction id), refunded or not.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeVar

from magasin.eventstore.store import EventStore
from magasin.shared.errors import (
    AlreadyProcessed,
    BusinessRuleViolation,
    Conflict,
    StorageError,
    Unavailable,
)
from magasin.shared.ids import hex_id

FAILING_METHOD = "FAIL_CARD"
LIMIT_CENTS = 1_000_000
"""The bank declines any charge over 10000.00 (amounts are in cents)."""
CHARGES, REFUNDS, CAPTURED = "bank.charges", "bank.refunds", "bank.captured"
REFUNDED = "bank.refunded"
"""The books' claim on a charge's one refund (by charge reference)."""
KEPT_IN_MEMORY = 10_000
"""Charges, captured amounts and refunds a bank with books remembers in memory, the most
recent ones: every path reads the books for the others. (It remembered all of them: three
objects a sale that a long-running payment process never let go, and that its garbage
collector walked again at every full collection.)"""

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Charge:
    """The bank's answer to a charge: approved with a reference, or declined with a reason."""

    approved: bool
    reference: str
    decline_reason: str | None = None


@dataclass(frozen=True, slots=True)
class BankRecord:
    """What the bank recorded for the charge made with one idempotency key."""

    idempotency_key: str
    approved: bool
    reference: str
    amount: int
    currency: str
    decline_reason: str | None = None
    refund_reference: str | None = None
    """Set once the charge was given back."""

    @property
    def holds_money(self) -> bool:
        """The bank took the money and has not given it back."""
        return self.approved and self.refund_reference is None


class BankGateway(ABC):
    """Port of the bank. Charge and refund are idempotent per key: a retry gets the first
    answer; lookup changes nothing."""

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

    @abstractmethod
    async def lookup(self, idempotency_key: str) -> BankRecord | None:
        """The charge made with `idempotency_key` as the bank recorded it (approved or
        declined, refunded or not), or None when the bank never decided on that key."""


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
    """A bank with the original system's rules.

    Declines payment method FAIL_CARD (`declined`), amounts over 10000.00
    (`limit_exceeded`), non-positive amounts (`invalid_amount`) and a seeded random share
    `decline_rate` of the rest (`declined`). Each call waits `latency_s`. Set `reachable`
    to False to simulate an outage: every call then raises Unavailable.

    A real bank remembers its charges whatever happens to its clients. With a `ledger`
    store, so does this one: every charge and refund is written there before the answer,
    so all payment processes sharing that store see one bank, across restarts too (a
    refund handled by another process, a charge retried after a crash). Without one it
    remembers only in memory, for tests.
    """

    def __init__(
        self,
        latency_s: float = 0.1,
        decline_rate: float = 0.0,
        seed: int | None = None,
        ledger: EventStore | None = None,
        answer_latency_s: float = 0.0,
    ) -> None:
        if latency_s < 0 or answer_latency_s < 0:
            raise ValueError("latency_s and answer_latency_s must be >= 0")
        if not 0.0 <= decline_rate <= 1.0:
            raise ValueError("decline_rate must be within [0, 1]")
        self.latency_s = latency_s
        self.answer_latency_s = answer_latency_s
        """Time the bank's answer takes to come back once the bank recorded the call (the
        window in which a crashed client leaves money at the bank: see reconciliation)."""
        self.decline_rate = decline_rate
        self.reachable = True
        self._rng = random.Random(seed)
        self._charges: OrderedDict[str, tuple[_ChargeRequest, Charge]] = OrderedDict()
        self._captured: OrderedDict[str, int] = OrderedDict()
        """Approved charges still holding money: bank reference -> amount."""
        self._refunds: OrderedDict[str, _Refund] = OrderedDict()
        self._refunded: set[str] = set()
        """References of `_captured` refunded."""
        self._ledger = ledger
        self._lock = asyncio.Lock()

    @property
    def charges(self) -> list[Charge]:
        """Every distinct charge the bank decided on (approved or not), in order; with books,
        the KEPT_IN_MEMORY most recent ones."""
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
        async with self._lock:  # check-and-record is atomic for this process's callers
            answer = await self._charge(idempotency_key, _ChargeRequest(amount, currency, method))
        await self._answer()
        return answer

    async def _charge(self, idempotency_key: str, request: _ChargeRequest) -> Charge:
        """The key's charge: the one this instance remembers, else a new decision (or the
        one the books hold, see `_decide`); a different request on the key is a conflict."""
        known = self._charges.get(idempotency_key) or await self._decide(idempotency_key,
                                                                         request)
        if known[0] != request:
            raise Conflict(f"idempotency key {idempotency_key!r} was used for a different charge")
        return known[1]

    async def _decide(
        self, idempotency_key: str, request: _ChargeRequest
    ) -> tuple[_ChargeRequest, Charge]:
        """Decide on a key this instance does not remember and record it, without reading
        the books first: the write's claim on the key fails if any client of this bank
        decided on it before (a retry after a restart, another payment process), and the
        books then hold that decision (a key is claimed with its answer, in one commit). A
        new key, every sale's case, costs one write and no read."""
        reference = f"CH-{hex_id()[:16].upper()}"
        reason = self._decline_reason(request.amount, request.method)
        charge = Charge(approved=reason is None, reference=reference, decline_reason=reason)
        try:
            await self._write(CHARGES, idempotency_key, {
                "amount": request.amount, "currency": request.currency,
                "method": request.method, "approved": charge.approved,
                "reference": reference, "decline_reason": reason,
            })
        except AlreadyProcessed:
            known = await self._recall_charge(idempotency_key)
            if known is None:
                raise StorageError(
                    f"the bank's books claim key {idempotency_key!r} but hold no charge"
                ) from None
            return known
        self._keep(self._charges, idempotency_key, (request, charge))
        if charge.approved:
            self._hold(reference, request.amount)
        return request, charge

    async def refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        await self._call()
        async with self._lock:
            answer = await self._refund(idempotency_key, reference, amount)
        await self._answer()
        return answer

    async def lookup(self, idempotency_key: str) -> BankRecord | None:
        await self._call()
        if self._ledger is not None:
            # Read the books, not this instance's memory: another process (or the
            # reconciler's CLI) shares this bank.
            doc = await self._ledger.get_document(CHARGES, idempotency_key)
            if doc is None:
                return None
            refund: str | None = None
            if doc["approved"]:
                held = await self._ledger.get_document(CAPTURED, doc["reference"])
                if held is not None and held.get("refunded"):
                    refund = str(held.get("refund_reference") or "refunded")
            return BankRecord(
                idempotency_key, doc["approved"], doc["reference"], doc["amount"],
                doc["currency"], doc["decline_reason"], refund,
            )
        known = self._charges.get(idempotency_key)
        if known is None:
            return None
        request, charge = known
        refund = next((r.reference for r in self._refunds.values()
                       if r.charge_reference == charge.reference), None)
        return BankRecord(
            idempotency_key, charge.approved, charge.reference, request.amount,
            request.currency, charge.decline_reason, refund,
        )

    async def _refund(self, idempotency_key: str, reference: str, amount: int) -> str:
        known = self._refunds.get(idempotency_key) or await self._recall_refund(idempotency_key)
        if known is not None:
            if (known.charge_reference, known.amount) != (reference, amount):
                raise Conflict(
                    f"idempotency key {idempotency_key!r} was used for a different refund"
                )
            return known.reference
        if self._ledger is None:
            captured = self._captured.get(reference)
        else:
            # The books, not memory, say whether it was refunded: another process sharing
            # them may have refunded it (under another key), or this one before a restart.
            doc = await self._ledger.get_document(CAPTURED, reference)
            captured = None if doc is None else int(doc["amount"])
            if doc is not None:
                self._hold(reference, int(doc["amount"]))
                if doc.get("refunded"):
                    self._refunded.add(reference)
                    if await self._recall_refund(idempotency_key) is not None:
                        # This key's refund, committed by another client since this one
                        # looked for it: the same answer, not a refusal.
                        return await self._refund(idempotency_key, reference, amount)
        if captured is None:
            raise BusinessRuleViolation(f"no captured charge {reference!r} to refund")
        if reference in self._refunded:
            raise BusinessRuleViolation(f"charge {reference!r} is already refunded")
        if not 0 < amount <= captured:
            raise BusinessRuleViolation(
                f"refund of {amount} cents is not within the {captured} cents charged"
            )
        refund = _Refund(f"RF-{hex_id()[:16].upper()}", reference, amount)
        try:
            await self._write(REFUNDS, idempotency_key, {
                "reference": refund.reference, "charge_reference": reference, "amount": amount,
            })
        except AlreadyProcessed:
            return await self._refund(idempotency_key, reference, amount)  # refunded elsewhere
        self._keep(self._refunds, idempotency_key, refund)
        self._refunded.add(reference)
        return refund.reference

    async def _write(self, collection: str, key: str, body: dict[str, Any]) -> None:
        if self._ledger is None:
            return
        async with self._ledger.transaction() as uow:
            # The claim makes the key's first decision the only one, even between several
            # processes sharing these books (a second one fails at commit).
            uow.mark_processed(collection, key)
            uow.put_document(collection, key, body)
            if collection == CHARGES and body["approved"]:
                uow.put_document(CAPTURED, body["reference"], {"amount": body["amount"]})
            elif collection == REFUNDS:
                # One refund a charge: two processes refunding it at once under two keys
                # both read it unrefunded; the second fails here.
                uow.mark_processed(REFUNDED, body["charge_reference"])
                uow.put_document(CAPTURED, body["charge_reference"], {
                    "amount": self._captured[body["charge_reference"]], "refunded": True,
                    "refund_reference": body["reference"],
                })

    async def _recall_charge(self, key: str) -> tuple[_ChargeRequest, Charge] | None:
        doc = await self._ledger.get_document(CHARGES, key) if self._ledger else None
        if doc is None:
            return None
        known = (
            _ChargeRequest(doc["amount"], doc["currency"], doc["method"]),
            Charge(doc["approved"], doc["reference"], doc["decline_reason"]),
        )
        self._keep(self._charges, key, known)
        if doc["approved"]:
            self._hold(doc["reference"], doc["amount"])
        return known

    async def _recall_refund(self, key: str) -> _Refund | None:
        doc = await self._ledger.get_document(REFUNDS, key) if self._ledger else None
        if doc is None:
            return None
        refund = _Refund(doc["reference"], doc["charge_reference"], doc["amount"])
        self._keep(self._refunds, key, refund)
        return refund

    def _keep(self, memory: OrderedDict[K, V], key: K, value: V) -> K | None:
        """Remember `value`; with books, forget the oldest beyond KEPT_IN_MEMORY and return
        its key (without books, memory is all this bank has: it forgets nothing)."""
        memory[key] = value
        memory.move_to_end(key)
        if self._ledger is not None and len(memory) > KEPT_IN_MEMORY:
            return memory.popitem(last=False)[0]
        return None

    def _hold(self, reference: str, amount: int) -> None:
        """Remember a captured charge (and forget whether the one it pushes out was
        refunded: the books say, next time)."""
        if (forgotten := self._keep(self._captured, reference, amount)) is not None:
            self._refunded.discard(forgotten)

    async def _call(self) -> None:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if not self.reachable:
            raise Unavailable("the bank cannot be reached")

    async def _answer(self) -> None:
        if self.answer_latency_s > 0:
            await asyncio.sleep(self.answer_latency_s)

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
