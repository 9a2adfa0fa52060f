"""The transaction service's status feed: what a sale's stream starts from without reading."""

from __future__ import annotations

from typing import Any

import pytest

from magasin.transactions import feed as feed_module
from magasin.transactions.feed import StatusFeed


def doc(version: int, status: str = "PENDING") -> dict[str, Any]:
    return {"transaction_id": "t1", "version": version, "status": status, "history": []}


def test_a_stream_starts_from_the_last_change_this_process_committed() -> None:
    feed = StatusFeed()
    feed.changed("t1", doc(1))
    feed.changed("t1", doc(2, "PAYMENT_PROCESSED"))

    assert feed.last("t1") == doc(2, "PAYMENT_PROCESSED")
    assert feed.last("t2") is None


def test_a_change_told_without_its_document_sends_the_stream_to_the_store() -> None:
    """Another process's change (told by the projection's `elsewhere`) comes without the
    document: what this process committed before is then no longer the sale's state."""
    feed = StatusFeed()
    feed.changed("t1", doc(1))
    feed.changed("t1", version=2)

    assert feed.last("t1") is None


def test_an_older_document_told_after_a_later_change_is_not_taken_for_the_last() -> None:
    """This process's own change can be told (after its commit) once another process's
    later one was: the older document must not come back as the sale's state."""
    feed = StatusFeed()
    feed.changed("t1", version=3)
    feed.changed("t1", doc(2))
    assert feed.last("t1") is None

    feed.changed("t1", doc(4, "COMPLETED"))
    assert feed.last("t1") == doc(4, "COMPLETED")


def test_a_follower_is_handed_the_change_and_the_feed_forgets_the_oldest_sales(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed_module, "LAST_KEPT", 3)
    feed = StatusFeed()
    with feed.follow("t1") as follower:
        feed.changed("t1", doc(1))
        assert follower.event.is_set()
        assert follower.take() == doc(1)
        assert not follower.event.is_set()
    for tid in ("t2", "t3", "t4"):
        feed.changed(tid, {**doc(1), "transaction_id": tid})

    assert feed.last("t1") is None
    assert [feed.last(t) is not None for t in ("t2", "t3", "t4")] == [True, True, True]
