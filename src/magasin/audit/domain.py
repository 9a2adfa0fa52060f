"""The audit log's rules: compliance scopes, hash-chained entries and their verification.

Pure Python. An entry is a JSON object; its `hash` is the SHA-256 of the canonical JSON
(sorted keys, no spaces, UTF-8) of every other field, `prev_hash` included, so changing
any entry, or removing one, breaks the chain at that point:

    entry n-1                    entry n
    {..., hash: H(n-1)}  <----   {..., sequence: n, prev_hash: H(n-1), hash: H(n)}

Compliance scopes (why an entry matters to whom):

| scope   | events                                                                      |
|---------|-----------------------------------------------------------------------------|
| PCI-DSS | payment events: PaymentProcessed, PaymentFailed, PaymentRefunded, and the    |
|         | transaction's PaymentRecorded and RefundRecorded (card payment data flows)   |
| GDPR    | any event whose payload names a customer (`customer_id`): personal data      |
| SOX     | money and stock movements that reach the books: captures (PaymentProcessed), |
|         | refunds (PaymentRefunded), completed sales (TransactionCompleted) and stock  |
|         | leaving the shelves for good (InventoryCommitted; StockCommitted, in logs    |
|         | written before issue 11)                                                     |
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

GENESIS = "0" * 64
"""`prev_hash` of the first entry."""

PCI_DSS, GDPR, SOX = "PCI-DSS", "GDPR", "SOX"

PAYMENT_EVENTS = frozenset({
    "PaymentProcessed", "PaymentFailed", "PaymentRefunded", "PaymentRecorded", "RefundRecorded",
})
MONEY_MOVEMENTS = frozenset({
    "PaymentProcessed", "PaymentRefunded", "TransactionCompleted", "InventoryCommitted",
    "StockCommitted",
})
ALERTS = {"PaymentFailed": "payment_failed", "InventoryUnavailable": "inventory_unavailable"}
"""Event types that raise a compliance alert, and the alert's kind (seed: "Alert for
Failed Payment", "Generate Inventory Alert")."""


def scopes_of(event_type: str, payload: Mapping[str, Any]) -> list[str]:
    """The compliance scopes of an event, in a fixed order."""
    scopes = []
    if event_type in PAYMENT_EVENTS:
        scopes.append(PCI_DSS)
    if "customer_id" in payload:
        scopes.append(GDPR)
    if event_type in MONEY_MOVEMENTS:
        scopes.append(SOX)
    return scopes


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash is taken over: every field but `hash`, keys sorted."""
    return orjson.dumps(
        {k: v for k, v in entry.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS
    )


def digest(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def chain(entry: Mapping[str, Any], sequence: int, prev_hash: str) -> dict[str, Any]:
    """The entry as number `sequence` of the log, linked to the previous entry's hash."""
    linked = {**entry, "sequence": sequence, "prev_hash": prev_hash}
    linked["hash"] = digest(linked)
    return linked


@dataclass(frozen=True, slots=True)
class Problem:
    """Where the chain is broken and how."""

    sequence: int
    kind: str
    """`modified` (the entry's content does not match its hash), `deleted` (entries
    missing), `relinked` (its prev_hash is not the previous entry's hash), `truncated`
    (entries missing at the end), `head_missing` (entries exist without the head document
    that the end of the chain is checked against)."""
    detail: str
    event_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "kind": self.kind, "detail": self.detail,
                "event_id": self.event_id}


@dataclass
class Verifier:
    """Walks entries in stored order (feed it page by page) and notes every break."""

    checked: int = 0
    last_sequence: int = 0
    last_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)

    def feed(self, entries: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """`entries`: (position in the log, entry) pairs, positions increasing."""
        for position, entry in entries:
            self.checked += 1
            event_id = entry.get("event_id")
            if position != self.last_sequence + 1:
                self.problems.append(Problem(
                    self.last_sequence + 1, "deleted",
                    f"entries {self.last_sequence + 1}..{position - 1} are missing", None,
                ))
            if entry.get("sequence") != position or entry.get("hash") != digest(entry):
                self.problems.append(Problem(
                    position, "modified", "the entry does not match its hash", event_id,
                ))
            elif entry.get("prev_hash") != self.last_hash and position == self.last_sequence + 1:
                self.problems.append(Problem(
                    position, "relinked", "prev_hash is not the previous entry's hash",
                    event_id,
                ))
            self.last_sequence = position
            self.last_hash = str(entry.get("hash"))

    def finish(self, head_sequence: int, head_hash: str | None) -> None:
        """Compare the end of the walk with the head recorded with the last append."""
        if head_sequence > self.last_sequence:
            self.problems.append(Problem(
                self.last_sequence + 1, "truncated",
                f"entries {self.last_sequence + 1}..{head_sequence} are missing at the end",
            ))
        elif head_hash is not None and head_sequence == self.last_sequence \
                and head_hash != self.last_hash:
            self.problems.append(Problem(
                head_sequence, "modified", "the last entry's hash is not the recorded head",
            ))

    def headless(self) -> None:
        """The walk found entries but no head was recorded: the end cannot be checked."""
        if self.checked:
            self.problems.append(Problem(
                self.last_sequence, "head_missing",
                "entries exist but the chain's head document is missing; "
                "entries removed at the end would go unnoticed",
            ))

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head": self.last_sequence,
            "problems": [p.to_dict() for p in self.problems],
        }
