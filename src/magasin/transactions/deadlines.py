"""Saga step deadlines: how long each step may take, and when a waiting saga is due.

Pure policy (no store, no clock of its own): the saga index and the deadline loop in
`sagas.py` ask it when a step that started at some moment must be given up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from magasin.config import Settings
from magasin.shared.clock import from_micros, to_micros
from magasin.transactions.domain import COMPENSATION, ORDER

STEPS = (ORDER, "payment", "reservation", "fulfilment", COMPENSATION)


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds each saga step may take before the saga is compensated (a choreographed sale
    has one, `order`; an orchestrated one has `payment`, `reservation` and `fulfilment`);
    for the compensation itself, how long before it is asked for again (exponential
    backoff, `retry_attempts` times) and then reported stuck."""

    payment_s: float = 60.0
    reservation_s: float = 30.0
    fulfilment_s: float = 30.0
    compensation_s: float = 30.0
    retry_multiplier: float = 2.0
    retry_max_delay_s: float = 600.0
    retry_attempts: int = 5
    order_s: float = 120.0

    @classmethod
    def of(cls, settings: Settings) -> Deadlines:
        return cls(
            payment_s=settings.deadline_payment_s,
            reservation_s=settings.deadline_reservation_s,
            fulfilment_s=settings.deadline_fulfilment_s,
            compensation_s=settings.deadline_compensation_s,
            retry_multiplier=settings.compensation_retry_multiplier,
            retry_max_delay_s=settings.compensation_retry_max_delay_s,
            retry_attempts=settings.compensation_max_attempts,
            order_s=settings.deadline_order_s,
        )

    def limit(self, step: str, attempt: int = 0) -> timedelta:
        """How long the step may take; for `compensation`, after its `attempt`-th retry."""
        if step == COMPENSATION:
            delay = self.compensation_s * self.retry_multiplier ** attempt
            return timedelta(seconds=min(delay, max(self.retry_max_delay_s, self.compensation_s)))
        seconds = {
            ORDER: self.order_s,
            "payment": self.payment_s,
            "reservation": self.reservation_s,
            "fulfilment": self.fulfilment_s,
        }.get(step)
        if seconds is None:
            raise ValueError(f"unknown saga step {step!r}; one of {', '.join(STEPS)}")
        return timedelta(seconds=seconds)

    def due_at(self, step: str, started_at: datetime, attempt: int = 0) -> datetime:
        """When a step that started at `started_at` is given up (or, for a compensation,
        retried or reported stuck)."""
        return started_at + self.limit(step, attempt)

    def is_due(self, step: str, started_at: datetime, now: datetime) -> bool:
        return now >= self.due_at(step, started_at)


def due_key(due_at: datetime, transaction_id: str) -> str:
    """Key of a saga in the deadline index: keys sort by due time (fixed-width
    microseconds), so the loop reads only the due head of the index."""
    return f"{to_micros(due_at):020d}:{transaction_id}"


def due_of(key: str) -> datetime:
    """The due time encoded in a deadline index key."""
    return from_micros(int(key.partition(":")[0]))
