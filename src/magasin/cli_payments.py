"""`magasin payments reconcile`: settle with the bank every charge it approved for a payment
recorded as failed (see `payments/reconcile.py`), from the embedded store or (`--distributed`)
the payment service's PostgreSQL schema. Safe to run while the services run, and twice."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from magasin.bootstrap import distributed_store, embedded_store
from magasin.cli_run import run_command
from magasin.config import Settings
from magasin.payments.reconcile import Settlement, reconcile
from magasin.payments.service import bank_simulator
from magasin.shared.clock import utcnow

app = typer.Typer(help="Payments: reconciliation with the bank.", no_args_is_help=True)
console = Console()


@app.command("reconcile")
def reconcile_command(
    distributed: Annotated[bool, typer.Option(
        "--distributed", help="The payment service's PostgreSQL (MAGASIN_DATABASE_URL)."
    )] = False,
    grace: Annotated[float | None, typer.Option(
        "--grace", min=0, help="Only payments failed at least this many seconds ago "
        "(default MAGASIN_RECONCILE_GRACE_S)."
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Refund at the bank (or record as refunded) every approved charge whose payment our
    books record as failed; each one exactly once."""
    settings = Settings()
    store = distributed_store(settings, "payment") if distributed else embedded_store(settings)
    wait = timedelta(seconds=settings.reconcile_grace_s if grace is None else grace)

    async def main() -> list[Settlement]:
        async with store:
            return await reconcile(store, bank_simulator(store, settings), utcnow(), wait)

    done = run_command(main())
    if as_json:
        for s in done:
            print(json.dumps({
                "transaction_id": s.transaction_id, "action": s.action, "amount": s.amount,
                "bank_reference": s.bank_reference, "refund_reference": s.refund_reference,
            }))
        return
    table = Table("transaction", "action", "amount", "charge", "refund", title="Reconciliation")
    for s in done:
        table.add_row(s.transaction_id, s.action, str(s.amount), s.bank_reference or "",
                      s.refund_reference or "")
    console.print(table)
    found = [s for s in done if s.found_money]
    console.print(f"{len(done)} failed payment(s) checked at the bank; {len(found)} held "
                  f"money: {sum(s.amount for s in found)} cents settled.")
