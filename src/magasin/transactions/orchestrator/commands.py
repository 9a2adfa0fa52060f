"""The envelope of the orchestrator's pending command, built from the saga and its sale."""

from __future__ import annotations

from magasin.shared.commands import (
    ChargePayment,
    PrepareOrder,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    VoidPayment,
)
from magasin.transactions.domain import Transaction
from magasin.transactions.orchestrator.domain import Command, Orchestration

REPLY_TO = "transaction"
"""Replies come back to the transaction service's consumer (the events it reads anyway)."""


def pending_envelope(saga: Orchestration, sale: Transaction, reply_to: str = REPLY_TO) -> object:
    """The command the saga waits on, as the message to send; ValueError if none."""
    command, command_id = saga.pending_command, saga.command_id
    if command is None or command_id is None:
        raise ValueError(f"saga {saga.id} waits on no command")
    tid = sale.id
    match command:
        case Command.CHARGE_PAYMENT:
            return ChargePayment(command_id, reply_to, tid, sale.store_id, sale.lines,
                                 sale.total, sale.currency, sale.payment_method)
        case Command.RESERVE_STOCK:
            return ReserveStock(command_id, reply_to, tid, sale.store_id, sale.lines)
        case Command.PREPARE_ORDER:
            assert saga.reservation_id is not None  # PrepareOrder follows InventoryReserved
            return PrepareOrder(command_id, reply_to, tid, sale.store_id, saga.reservation_id,
                                sale.lines)
        case Command.REFUND_PAYMENT:
            return RefundPayment(command_id, reply_to, tid, saga.reason or "")
        case Command.RELEASE_STOCK:
            return ReleaseStock(command_id, reply_to, tid, saga.reason or "")
        case Command.VOID_PAYMENT:
            return VoidPayment(command_id, reply_to, tid, saga.reason or "", sale.store_id,
                               sale.total, sale.currency)
