"""The audit log's hash chain and its verification, as pure functions."""

from __future__ import annotations

from typing import Any

from magasin.audit.domain import GENESIS, Verifier, chain, digest, scopes_of


def entries(count: int) -> list[dict[str, Any]]:
    chained: list[dict[str, Any]] = []
    last = GENESIS
    for n in range(1, count + 1):
        entry = chain({"event_id": f"e{n}", "event_type": "PaymentProcessed",
                       "payload": {"amount": n * 100}}, n, last)
        chained.append(entry)
        last = entry["hash"]
    return chained


def verify(chained: list[dict[str, Any]], head: tuple[int, str] | None = None) -> Verifier:
    verifier = Verifier()
    verifier.feed((e["sequence"], e) for e in chained)
    if head is not None:
        verifier.finish(*head)
    return verifier


def test_each_entry_links_to_the_hash_of_the_one_before() -> None:
    first, second = entries(2)
    assert first["prev_hash"] == GENESIS
    assert second["prev_hash"] == first["hash"]
    assert second["hash"] == digest(second)


def test_the_hash_does_not_depend_on_key_order() -> None:
    entry = entries(1)[0]
    assert digest(dict(reversed(list(entry.items())))) == entry["hash"]


def test_an_untouched_chain_verifies() -> None:
    chained = entries(5)
    verifier = verify(chained, head=(5, chained[-1]["hash"]))
    assert verifier.ok
    assert verifier.report() == {"ok": True, "checked": 5, "head": 5, "problems": []}


def test_a_modified_payload_is_reported_at_its_entry() -> None:
    chained = entries(5)
    chained[2]["payload"]["amount"] = 1
    (problem,) = verify(chained).problems
    assert (problem.sequence, problem.kind, problem.event_id) == (3, "modified", "e3")


def test_a_modified_entry_with_a_recomputed_hash_breaks_the_next_link() -> None:
    chained = entries(5)
    chained[1]["payload"]["amount"] = 1
    chained[1]["hash"] = digest(chained[1])
    (problem,) = verify(chained).problems
    assert (problem.sequence, problem.kind) == (3, "relinked")


def test_a_deleted_entry_is_reported_where_it_was() -> None:
    chained = entries(5)
    del chained[1]
    (problem,) = verify(chained).problems
    assert (problem.sequence, problem.kind) == (2, "deleted")


def test_deleted_entries_at_the_end_are_caught_by_the_head() -> None:
    chained = entries(5)
    (problem,) = verify(chained[:3], head=(5, chained[-1]["hash"])).problems
    assert (problem.sequence, problem.kind) == (4, "truncated")


def test_payment_customer_and_money_events_get_their_compliance_scopes() -> None:
    assert scopes_of("PaymentProcessed", {"amount": 1}) == ["PCI-DSS", "SOX"]
    assert scopes_of("PaymentFailed", {"amount": 1}) == ["PCI-DSS"]
    assert scopes_of("TransactionCreated", {"customer_id": "c"}) == ["GDPR"]
    assert scopes_of("TransactionCompleted", {"customer_id": "c"}) == ["GDPR", "SOX"]
    assert scopes_of("InventoryCommitted", {}) == ["SOX"]
    assert scopes_of("StockAdded", {}) == []
