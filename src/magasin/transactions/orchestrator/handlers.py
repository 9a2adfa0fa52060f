"""Consumer `transaction.orchestrator`: runs the orchestrated sales.

On an orchestrated TransactionCreated it starts the saga and sends its first command; on
each reply (the services' usual events) it advances the saga and sends the next command.
Decisions (the saga's events) and the command envelope commit in one unit of work, so the
outbox publishes the command exactly when the decision is stored. The consumer requires the
routing tag `saga_mode=orchestration` (`transactions.tags`): the events of choreographed
sales never reach it (those would find no orchestration stream and change nothing).
"""

from __future__ import annotations

from magasin.eventstore.repository import Repository
from magasin.eventstore.store import UnitOfWork
from magasin.messaging.bus import Handler
from magasin.shared.events import SCHEMAS, TransactionCreated
from magasin.shared.ids import stream_id
from magasin.shared.messages import RecordedEvent
from magasin.transactions import tags
from magasin.transactions.domain import COMPENSATION, Transaction
from magasin.transactions.orchestrator.commands import pending_envelope
from magasin.transactions.orchestrator.domain import REPLIES, Orchestration
from magasin.transactions.orchestrator.routing import SAGA_MODE, Mode

CONSUMER = "transaction.orchestrator"
COMMANDS = "saga_command"
"""Stream type of the command envelopes sent for a sale (one stream per sale)."""

REFERENCES = {
    "PaymentProcessed": "payment_id", "InventoryReserved": "reservation_id",
    "OrderFulfilled": "order_id",
}
REASONS = ("PaymentFailed", "OrderFulfillmentFailed")

STATE = "transaction.orchestrations"
"""Where each orchestrated saga stands, written with its decisions (same commit), for the
sagas API: {transaction_id, step, pending_command, command_id, outcome}."""

sagas = Repository(Orchestration)
sales = Repository(Transaction)


def _save(uow: UnitOfWork, saga: Orchestration) -> None:
    sagas.save(uow, saga)
    pending = saga.pending_command
    uow.put_document(STATE, saga.id, {
        "transaction_id": saga.id,
        "step": saga.step or (COMPENSATION if pending is not None else None),
        "pending_command": pending.value if pending is not None else None,
        "command_id": saga.command_id,
        "outcome": saga.outcome.value if saga.outcome is not None else None,
    })


def _send_pending(uow: UnitOfWork, saga: Orchestration, sale: Transaction) -> None:
    envelope = pending_envelope(saga, sale)
    name = type(envelope).__name__
    uow.append(stream_id(COMMANDS, sale.id), [uow.new_event(name, SCHEMAS.dump(envelope))])


def _orchestrated(uow: UnitOfWork) -> None:
    """What this unit of work records belongs to an orchestrated saga: the services'
    choreographed reactions (to SagaAborted, say) leave it to the orchestrator, whose
    consumer gets only such events (`tags.ORCHESTRATED`). Other baggage is kept."""
    tags.add_baggage(uow, {SAGA_MODE: Mode.ORCHESTRATION.value})


async def abort(uow: UnitOfWork, sale: Transaction, reason: str, step: str | None) -> bool:
    """Give up an orchestrated sale (a deadline, an operator): the orchestrator decides the
    compensation and sends its first command; the sale records the same decision. Both or
    neither: False when either has nothing to abort (the saga ended or moved past `step`,
    or the other side is about to end it)."""
    saga = await sagas.find(uow, sale.id)
    _orchestrated(uow)
    if saga is None:
        return False  # the orchestrator has not started it yet: the next sweep will see
    if sale.step is None or saga.step is None or (step is not None and sale.step != step):
        return False
    saga.abort(reason)
    if not sale.abort(reason, release=saga.to_release):
        return False
    _save(uow, saga)
    _send_pending(uow, saga, sale)
    return True


async def retry(uow: UnitOfWork, sale: Transaction, attempt: int | None) -> bool:
    """Ask again for an orchestrated sale's compensation: the orchestrator sends its pending
    command once more (each service's effect happens once); False if there is none."""
    saga = await sagas.find(uow, sale.id)
    _orchestrated(uow)
    if saga is None or saga.pending_command is None or not sale.retry_compensation(attempt):
        return False
    _send_pending(uow, saga, sale)
    return True


async def on_created(event: RecordedEvent, uow: UnitOfWork) -> None:
    created: TransactionCreated = SCHEMAS.validate(event)
    if created.saga_mode != Mode.ORCHESTRATION:
        return
    tid = created.transaction_id
    if await sagas.find(uow, tid) is not None:
        return  # a redelivery: the saga started already
    # Everything this saga causes (commands, then the services' replies) carries its mode,
    # so the services' choreographed reactions know to leave the sale alone.
    _orchestrated(uow)
    sale = await sales.get(uow, tid)
    saga = Orchestration.start(tid, created.total, created.currency)
    _save(uow, saga)
    _send_pending(uow, saga, sale)


async def on_reply(event: RecordedEvent, uow: UnitOfWork) -> None:
    reply = SCHEMAS.validate(event)
    tid = reply.transaction_id
    saga = await sagas.find(uow, tid)
    if saga is None:
        return  # a choreographed sale
    sent = saga.command_id
    reference = getattr(reply, REFERENCES[event.type]) if event.type in REFERENCES else None
    reason = reply.reason if event.type in REASONS else None
    if not saga.reply(event.type, reference, reason):
        return  # a duplicate, or a reply to no pending command
    _save(uow, saga)
    if saga.pending_command is not None and saga.command_id != sent:
        _send_pending(uow, saga, await sales.get(uow, tid))


def orchestrator_handlers() -> dict[str, Handler]:
    replies = {name for names in REPLIES.values() for name in names}
    return {"TransactionCreated": on_created, **dict.fromkeys(sorted(replies), on_reply)}
