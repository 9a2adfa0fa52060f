"""Stuck sagas: the loop that compensates the sagas past their step's deadline (and asks
again for a compensation that does not finish, then reports it stuck), and the commands
that abort or retry one (deadline or admin).

The loop reads the saga index that `saga_index.save` writes with every sale it saves:

- `transaction.sagas/<transaction id>`: status, current step (`compensation` while
  CANCELLING), when that step started, compensation retries, stuck or not;
- `transaction.sagas_stuck/<transaction id>`: the sagas reported stuck;
- `transaction.saga_deadlines/<due micros>:<transaction id>`: one entry per waiting saga,
  keyed by the moment its step is due, so the loop reads only the head of the index that
  is due (never every saga) and stops at the first entry in the future.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from datetime import datetime
from typing import Any

from magasin.eventstore.store import Causation, EventStore, UnitOfWork
from magasin.messaging.partitioning import configured_partitions, partition_metadata
from magasin.shared.clock import utcnow
from magasin.shared.errors import ConcurrencyError, Conflict, NotFound
from magasin.transactions import saga_index
from magasin.transactions.deadlines import Deadlines, due_of
from magasin.transactions.domain import COMPENSATION, Transaction
from magasin.transactions.orchestrator import handlers as orchestrator
from magasin.transactions.orchestrator.routing import Mode

log = logging.getLogger("magasin.transactions.sagas")

SAGAS = saga_index.SAGAS
DEADLINES = saga_index.DEADLINES
PAGE = 100
ATTEMPTS = 10
"""Tries of an abort that keeps losing version races with the saga's own handlers."""

Clock = Callable[[], datetime]
DEFAULT_DEADLINES = saga_index.DEFAULT_DEADLINES
sales = saga_index.sales


async def _decide(
    store: EventStore,
    transaction_id: str,
    actor: str,
    decision: Callable[[UnitOfWork, Transaction], Awaitable[bool]],
    refusal: Callable[[Transaction], str],
    deadlines: Deadlines,
) -> Transaction:
    """Load the sale, let `decision` record what it decides and save it (its saga index
    with it); Conflict (with `refusal`'s words) when it decides nothing. Redone on a
    version race."""
    causation = Causation(
        correlation_id=transaction_id, metadata={"service": "transaction", "actor": actor}
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            async with store.transaction(causation) as uow:
                sale = await sales.get(uow, transaction_id)
                # Its events join the sale's partition (the customer's), like every other.
                uow.causation = replace(causation, metadata={
                    **causation.metadata,
                    **partition_metadata(sale.customer_id, configured_partitions()),
                })
                if not await decision(uow, sale):
                    raise Conflict(refusal(sale))
                await saga_index.save(uow, sale, deadlines)
            return sale
        except ConcurrencyError:
            # A saga step landed meanwhile: decide again on the fresh state.
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")


Decision = Callable[[UnitOfWork, Transaction], Awaitable[bool]]


def _aborting(reason: str, step: str | None) -> Decision:
    """Give the sale up; an orchestrated one through its orchestrator, which then sends
    the compensation's commands in order."""

    async def decide(uow: UnitOfWork, sale: Transaction) -> bool:
        if sale.saga_mode == Mode.ORCHESTRATION:
            return await orchestrator.abort(uow, sale, reason, step)
        return sale.abort(reason, step)

    return decide


def _retrying(attempt: int | None) -> Decision:
    """Ask again for the compensation; an orchestrated sale's orchestrator resends its
    pending command."""

    async def decide(uow: UnitOfWork, sale: Transaction) -> bool:
        if sale.saga_mode == Mode.ORCHESTRATION:
            return await orchestrator.retry(uow, sale, attempt)
        return sale.retry_compensation(attempt)

    return decide


async def abort(
    store: EventStore,
    transaction_id: str,
    reason: str,
    step: str | None = None,
    actor: str = "deadline",
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> Transaction:
    """Give up the saga at its current step (only at `step`, when given) and start its
    compensation. Raises NotFound for an unknown sale and Conflict when there is nothing
    to abort (it compensates already, ended, or moved past `step`)."""
    return await _decide(
        store, transaction_id, actor, _aborting(reason, step),
        lambda sale: f"transaction {transaction_id} is {sale.status}: "
        + (f"not waiting for its {step}" if step else "nothing to compensate"),
        deadlines,
    )


async def retry_compensation(
    store: EventStore, transaction_id: str, attempt: int | None = None, actor: str = "deadline",
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> Transaction:
    """Ask again for the compensation of a CANCELLING sale (only after `attempt` retries,
    when given). Conflict when it is not compensating (any more) or was retried since."""
    return await _decide(
        store, transaction_id, actor, _retrying(attempt),
        lambda sale: f"transaction {transaction_id} is {sale.status}: no compensation to retry",
        deadlines,
    )


async def stall(
    store: EventStore, transaction_id: str, attempt: int,
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> Transaction:
    """Report the compensation of a sale stuck after `attempt` retries."""
    async def stalled(uow: UnitOfWork, sale: Transaction) -> bool:
        return sale.stall(attempt)

    return await _decide(
        store, transaction_id, "deadline", stalled,
        lambda sale: f"transaction {transaction_id} is {sale.status}: not stuck",
        deadlines,
    )


async def force(
    store: EventStore, transaction_id: str, deadlines: Deadlines = DEFAULT_DEADLINES
) -> tuple[Transaction, bool]:
    """An operator's forced compensation: a waiting saga is given up at its step, a
    compensating one (stuck or not) has its compensation asked for again at once. Returns
    the sale and whether it was such a retry."""
    retried: list[bool] = []

    async def decision(uow: UnitOfWork, sale: Transaction) -> bool:
        retried[:] = [False]
        if await _aborting("forced", None)(uow, sale):
            return True
        retried[:] = [True]
        return await _retrying(None)(uow, sale)

    sale = await _decide(
        store, transaction_id, "admin", decision,
        lambda sale: f"transaction {transaction_id} is {sale.status}: nothing to compensate",
        deadlines,
    )
    return sale, retried[0]


async def abort_overdue(
    store: EventStore, now: datetime, deadlines: Deadlines = DEFAULT_DEADLINES
) -> int:
    """Act on every saga whose current step is due at `now`; returns how many were acted on.

    A waiting saga is aborted (compensated); a compensating one has its compensation asked
    for again, `deadlines.retry_attempts` times with growing delays, and is then reported
    stuck. Reads the deadline index in due order and stops at the first entry not due
    yet. The index is written with the sale, so an entry read just before the saga moved
    on (or was acted on by another process) meets a refusal, changes nothing and is
    dropped (`saga_index.repair`).
    """
    acted = 0
    after: str | None = None
    while True:
        rows = await store.find_documents(DEADLINES, after_key=after, limit=PAGE)
        for key, entry in rows:
            if due_of(key) > now:
                return acted
            tid, step = entry["transaction_id"], entry["step"]
            try:
                if step != COMPENSATION:
                    await abort(store, tid, f"deadline:{step}", step, deadlines=deadlines)
                    log.warning("saga %s passed its %s deadline: compensating it", tid, step)
                elif (attempt := int(entry.get("attempt", 0))) < deadlines.retry_attempts:
                    await retry_compensation(store, tid, attempt, deadlines=deadlines)
                    log.warning("compensation of saga %s not confirmed in time: asking again "
                                "(retry %d of %d)", tid, attempt + 1, deadlines.retry_attempts)
                else:
                    await stall(store, tid, attempt, deadlines)
                    log.error("compensation of saga %s still not confirmed after %d retries: "
                              "reported stuck", tid, attempt)
            except (Conflict, NotFound):
                await saga_index.repair(store, tid, key, deadlines)
                continue
            acted += 1
        if len(rows) < PAGE:
            return acted
        after = rows[-1][0]


def deadline_loop(
    store: EventStore, every_s: float, clock: Clock = utcnow,
    deadlines: Deadlines = DEFAULT_DEADLINES,
) -> Callable[[], Coroutine[Any, Any, None]]:
    """A background loop (for `Service.loops`) acting on overdue sagas every `every_s`."""

    async def loop() -> None:
        while True:
            try:
                await abort_overdue(store, clock(), deadlines)
            except Exception:
                # A broken sweep must not stop the next one (the database may come back).
                log.exception("saga deadline sweep failed")
            await asyncio.sleep(every_s)

    return loop
