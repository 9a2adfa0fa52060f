"""Builds the audit service: embedded, a projection chaining the log's events; distributed,
a consumer of every published event that chains it, and the sequencer loop that chains what
an earlier version staged. The routes in both."""

from __future__ import annotations

import logging

from magasin.audit import api
from magasin.audit.log import CONSUMER, Chainer, Sequencer, projection
from magasin.service import Service, ServiceContext
from magasin.shared.messages import RecordedEvent

log = logging.getLogger("magasin.audit.alerts")


def alert(kind: str, event: RecordedEvent) -> None:
    """A compliance alert: one error log line and the `magasin_audit_alerts_total` counter."""
    from magasin.observability.metrics import AUDIT_ALERTS

    AUDIT_ALERTS.labels(kind=kind).inc()
    payload = event.payload
    log.error(
        "ALERT %s: transaction %s (%s)", kind, payload.get("transaction_id"),
        payload.get("reason") or payload.get("missing"),
    )


def build(ctx: ServiceContext) -> Service:
    if ctx.mode == "embedded":
        # Every event is in this process's log: chain it there, no delivery, no staging.
        return Service(name="audit", consumers={}, router=api.router(ctx.store),
                       projections=(projection(alert),))
    chainer = Chainer()
    ctx.store.before_commit(chainer.seal)
    return Service(
        name="audit",
        consumers={CONSUMER: chainer.handlers(alert)},
        whole_log=frozenset({CONSUMER}),
        router=api.router(ctx.store),
        loops=(Sequencer(ctx.store).run,),
    )
