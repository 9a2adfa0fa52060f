"""Which process consumes which partition (issue 12): membership and leases in the store.

The processes of a service that consume one queue group (`<namespace>.<consumer>`) share
its N partitions. Each process is a member with a heartbeat (a document that expires
`lease` seconds after its last renewal); the live members, sorted, take the partitions in
turn (partition p goes to member p mod m), so 2 processes and 4 partitions own 2 each.

A partition changes hands through its lease document only: the new owner starts
consuming once the lease is free (deleted by the old owner after it drained what it had
taken) or expired (the old owner died: its broker connection is gone, so what it held
unacknowledged is back in the queue, in order). The broker's single-active-consumer flag
on each partition queue stays the last guard: were two processes ever to consume one
partition (a process frozen longer than its lease), only one of them gets messages.

Expiry compares wall clocks of the service's hosts: keep them in sync (NTP) well within
the lease. Documents live in the service's own event store, so no other store is needed.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from magasin.eventstore.store import EventStore, UnitOfWork

MEMBERS = "bus.members"
LEASES = "bus.leases"
_PAGE = 500
DEFAULT_LEASE = 3.0
"""Seconds a member or lease stays valid without renewal: a dead process's partitions
are taken over within about 4/3 of this (one renewal period later)."""


def new_member_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def assignment(members: list[str], partitions: int) -> dict[int, str]:
    """Partition -> member: the sorted members take the partitions in turn."""
    ordered = sorted(members)
    return {p: ordered[p % len(ordered)] for p in range(partitions)} if ordered else {}


@dataclass(frozen=True, slots=True)
class Lease:
    group: str
    partition: int
    owner: str
    expires: float


class Ownership:
    """One process's view of one consumer group: `plan()` on every tick."""

    def __init__(
        self,
        store: EventStore,
        group: str,
        partitions: int,
        *,
        member: str | None = None,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.group = group
        self.partitions = partitions
        self.member = member or new_member_id()
        self.lease = lease
        self.clock = clock
        self.owned: set[int] = set()
        """Partitions this process consumes (or drains before giving them up)."""

    async def plan(self) -> tuple[set[int], set[int]]:
        """Renew this member and its leases; returns (partitions to start consuming, to
        give up). Those to start are leased to this member already; give them up with
        `released` once drained."""
        return (await plan_all([self]))[0]

    def _decide(
        self, members: list[dict[str, Any]], held: list[dict[str, Any]], now: float
    ) -> tuple[set[int], set[int], set[int]]:
        """(to acquire, to release, to keep leased) from the group's documents."""
        # This member counts as live from the renewal committed with its leases: the
        # others see it from their next tick.
        live = [doc["member"] for doc in members
                if doc["expires"] > now and doc["member"] != self.member]
        live.append(self.member)
        target = {p for p, m in assignment(live, self.partitions).items() if m == self.member}
        leases = {int(doc["partition"]): doc for doc in held}

        def taken_by_another(p: int) -> bool:
            doc = leases.get(p)
            return doc is not None and doc["owner"] != self.member and doc["expires"] > now

        release = {p for p in self.owned if p not in target or taken_by_another(p)}
        acquire = {p for p in target - self.owned if not taken_by_another(p)}
        keep = (self.owned | acquire) - {p for p in release if taken_by_another(p)}
        return acquire, release, keep

    def _renew(self, uow: UnitOfWork, keep: set[int], now: float) -> None:
        uow.put_document(MEMBERS, f"{self.group}/{self.member}", {
            "group": self.group, "member": self.member, "expires": now + self.lease,
        })
        for p in sorted(keep):
            uow.put_document(LEASES, f"{self.group}/{p}", {
                "group": self.group, "partition": p, "owner": self.member,
                "expires": now + self.lease,
            })

    async def released(self, partition: int) -> None:
        """The partition is drained: free its lease (unless another took it meanwhile)."""
        self.owned.discard(partition)
        key = f"{self.group}/{partition}"
        doc = await self.store.get_document(LEASES, key)
        if doc is not None and doc["owner"] == self.member:
            async with self.store.transaction() as uow:
                uow.delete_document(LEASES, key)

    async def leave(self) -> None:
        """A clean stop: the others take this member's partitions at their next tick."""
        for partition in sorted(self.owned):
            await self.released(partition)
        async with self.store.transaction() as uow:
            uow.delete_document(MEMBERS, f"{self.group}/{self.member}")



async def plan_all(
    ownerships: Sequence[Ownership],
) -> list[tuple[set[int], set[int]]]:
    """`Ownership.plan` for several groups of one process and store at once: the members
    and leases of them all read in one query each, every renewal in one unit of work."""
    if not ownerships:
        return []
    store = ownerships[0].store
    if any(o.store is not store for o in ownerships):
        raise ValueError("plan_all needs ownerships of one store")
    groups = {o.group for o in ownerships}
    where = {"group": ownerships[0].group} if len(groups) == 1 else None
    members = await _docs(store, MEMBERS, where)
    held = await _docs(store, LEASES, where)
    plans = []
    async with store.transaction() as uow:
        for ownership in ownerships:
            now = ownership.clock()
            acquire, release, keep = ownership._decide(
                [d for d in members if d.get("group") == ownership.group],
                [d for d in held if d.get("group") == ownership.group], now)
            ownership._renew(uow, keep, now)
            plans.append((acquire, release))
    for ownership, (acquire, _) in zip(ownerships, plans, strict=True):
        ownership.owned |= acquire
    return plans


async def _docs(
    store: EventStore, collection: str, where: dict[str, str] | None
) -> list[dict[str, Any]]:
    """Every document of `collection` (matching `where`), a page a query, without the
    empty page after a short one."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = await store.find_documents(collection, where=where, after_key=after,
                                          limit=_PAGE)
        found += [doc for _, doc in page]
        if len(page) < _PAGE:
            return found
        after = page[-1][0]


async def leases(store: EventStore, group: str, now: float | None = None) -> list[Lease]:
    """The live leases of a group (who consumes which partition), by partition."""
    now = time.time() if now is None else now
    docs = await store.find_documents(LEASES, where={"group": group}, limit=10_000)
    found = [Lease(group, int(d["partition"]), d["owner"], d["expires"]) for _, d in docs]
    return sorted((lease for lease in found if lease.expires > now),
                  key=lambda lease: lease.partition)
