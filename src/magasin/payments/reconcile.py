"""Reconciliation with the bank: settle every charge the bank approved for a payment our
books record as failed, exactly once.

Money stays at the bank when the bank approves a charge and our capture never commits: the
payment process died between the bank's answer and its commit (the bus then redelivers the
charge, but a void may have won meanwhile), or a void won the race against the capture and
the process that held the approval in memory (`ChargeDeadline.settle_overtaken`) died. In
both cases the payment ends FAILED — the saga gave it up and will not use that money — and
`payment.unsettled` names it (written with every void, and with every failure for want of
an answer). For each one older than `grace` (so a charge still in flight has answered), the
reconciler asks the bank (`BankGateway.lookup`, by the transaction id) and:

- nothing approved at the bank: nothing to do;
- approved and still held: refunds it at the bank (key `<tid>:refund`, the one refund a
  transaction can get) and records `ChargeReconciled(action=refunded)`;
- approved and already given back (the racing process refunded it before dying): records
  `ChargeReconciled(action=recorded)`, so our books say where the money went.

Exactly once, also with two reconcilers at work: the bank's refund is idempotent per key
(the second caller gets the first refund's reference), and `ChargeReconciled` is appended at
the payment stream's expected version, so the second commit fails, reloads and finds the
payment settled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import Causation, EventStore
from magasin.observability import metrics
from magasin.payments.aborts import UNSETTLED
from magasin.payments.domain import Payment, PaymentStatus
from magasin.payments.gateway import BankGateway, BankRecord
from magasin.payments.handlers import refund_key
from magasin.shared.clock import utcnow
from magasin.shared.errors import ConcurrencyError

log = logging.getLogger("magasin.payments.reconcile")

payments = Repository(Payment)
ATTEMPTS = 5
PAGE = 100


@dataclass(frozen=True, slots=True)
class Settlement:
    """What reconciliation did for one payment: `refunded` or `recorded` (money found at the
    bank), `none` (the bank holds nothing for it), `settled` (settled already, by another
    reconciler)."""

    transaction_id: str
    action: str
    amount: int = 0
    bank_reference: str | None = None
    refund_reference: str | None = None

    @property
    def found_money(self) -> bool:
        return self.action in ("refunded", "recorded")


async def reconcile(
    store: EventStore, gateway: BankGateway, now: datetime, grace: timedelta
) -> list[Settlement]:
    """Settle every unsettled payment noted at least `grace` before `now`."""
    done: list[Settlement] = []
    after: str | None = None
    cutoff = now - grace
    while rows := await store.find_documents(UNSETTLED, after_key=after, limit=PAGE):
        for tid, note in rows:
            if datetime.fromisoformat(note["at"]) <= cutoff:
                done.append(await settle(store, gateway, tid))
        if len(rows) < PAGE:
            break
        after = rows[-1][0]
    return done


async def settle(store: EventStore, gateway: BankGateway, transaction_id: str) -> Settlement:
    """Settle the bank's side of one payment (see the module docstring)."""
    record = await gateway.lookup(transaction_id)
    causation = Causation(
        correlation_id=transaction_id, metadata={"service": "payment", "actor": "reconciler"}
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with store.transaction(causation) as uow:
                payment = await payments.find(uow, transaction_id)
                uow.delete_document(UNSETTLED, transaction_id)
                if payment is not None and payment.reconciled is not None:
                    return Settlement(transaction_id, "settled", payment.reconciled.amount,
                                      payment.reconciled.bank_reference,
                                      payment.reconciled.refund_reference)
                if (record is None or not record.approved or payment is None
                        or payment.status is not PaymentStatus.FAILED):
                    # Nothing taken, or the money is accounted for (captured, refunded).
                    return Settlement(transaction_id, "none")
                settlement = await _settle_charge(gateway, transaction_id, record)
                assert settlement.refund_reference is not None
                payment.reconcile(record.reference, record.amount, settlement.action,
                                  settlement.refund_reference)
                payments.save(uow, payment)
                uow.after_commit(metrics.BANK_RECONCILED.labels(settlement.action).inc)
            log.warning("charge %s of transaction %s (%d cents) was held by the bank for a "
                        "failed payment: %s (%s)", record.reference, transaction_id,
                        record.amount, settlement.action, settlement.refund_reference)
            return settlement
        except ConcurrencyError:
            # Another reconciler recorded it first (or a redelivered charge moved the
            # stream): decide again on the fresh state.
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def _settle_charge(
    gateway: BankGateway, transaction_id: str, record: BankRecord
) -> Settlement:
    if record.holds_money:
        refund = await gateway.refund(refund_key(transaction_id), record.reference, record.amount)
        return Settlement(transaction_id, "refunded", record.amount, record.reference, refund)
    return Settlement(transaction_id, "recorded", record.amount, record.reference,
                      record.refund_reference)


def reconcile_loop(
    store: EventStore, gateway: BankGateway, every_s: float, grace_s: float,
    clock: Callable[[], datetime] = utcnow,
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background loop (for `Service.loops`) reconciling with the bank every `every_s`."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await reconcile(store, gateway, clock(), timedelta(seconds=grace_s))
            except Exception:
                # The bank or the database may be down: the next round tries again.
                log.exception("reconciliation with the bank failed")

    return loop
