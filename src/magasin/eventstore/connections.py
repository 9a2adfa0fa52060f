"""The PostgreSQL connection budget: how many connections a process and a cluster of them
open, and whether a server can serve them.

A process of the distributed deployment holds at most `pool_max + 1` connections to
PostgreSQL: its event store's pool and the store's LISTEN connection. A cluster of P such
processes (every service's processes, `cluster up`'s plan) thus needs at most
`P × (pool_max + 1)`, which must fit in what the server lets ordinary roles use:
`max_connections − superuser_reserved_connections − reserved_connections` (the last one
exists from PostgreSQL 16 on). Connections other clients hold at the moment only narrow
that further for now, so they warn rather than refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POOL_MAX_DEFAULT = 10
"""Connections of one store's pool unless configured (MAGASIN_PG_POOL_MAX)."""
LISTENER_CONNECTIONS = 1
"""The store's LISTEN connection, outside its pool."""


def per_process(pool_max: int) -> int:
    """Most connections one process of the distributed deployment opens."""
    return pool_max + LISTENER_CONNECTIONS


def per_cluster(processes: int, pool_max: int) -> int:
    """Most connections a cluster of `processes` such processes opens."""
    return processes * per_process(pool_max)


@dataclass(frozen=True)
class ServerLimits:
    """What a PostgreSQL server allows, and what other clients use right now."""

    max_connections: int
    reserved: int
    """superuser_reserved_connections (+ reserved_connections from PostgreSQL 16)."""
    in_use: int
    """Client connections open on the server (whatever their database)."""

    @property
    def usable(self) -> int:
        """Connections ordinary roles may open, all clients together."""
        return self.max_connections - self.reserved

    @property
    def free(self) -> int:
        return max(self.usable - self.in_use, 0)


def refusal(processes: int, pool_max: int, limits: ServerLimits) -> str | None:
    """Why the server cannot serve a cluster of `processes` (None when it can)."""
    needed = per_cluster(processes, pool_max)
    if needed <= limits.usable:
        return None
    fitting = limits.usable // processes - LISTENER_CONNECTIONS
    hint = (f"set MAGASIN_PG_POOL_MAX to {fitting} or less, "
            if fitting >= 1 else "")
    return (
        f"{processes} processes may open {processes} × ({pool_max} + 1) = {needed} "
        f"PostgreSQL connections (MAGASIN_PG_POOL_MAX={pool_max}, plus each one's "
        f"listener), but the server allows {limits.usable} (max_connections "
        f"{limits.max_connections} − {limits.reserved} reserved): "
        f"{hint}run fewer processes or raise max_connections"
    )


def shortage(own: int, pool_max: int, limits: ServerLimits) -> str | None:
    """A warning when the connections free right now cannot take one more process (which
    holds `own` of them already), None otherwise."""
    more = per_process(pool_max) - own
    if more <= limits.free:
        return None
    return (
        f"PostgreSQL has {limits.in_use} of {limits.usable} connections in use: this "
        f"process may need {more} more and only {limits.free} are free; under load it "
        "will wait for connections or fail with 'too many clients'"
    )


_LIMITS = """
SELECT current_setting('max_connections')::integer,
       current_setting('superuser_reserved_connections')::integer
       + coalesce(current_setting('reserved_connections', true)::integer, 0),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')
"""


async def server_limits(conn: Any) -> ServerLimits:
    """The limits of the server `conn` (an asyncpg connection) is connected to."""
    max_connections, reserved, in_use = await conn.fetchrow(_LIMITS)
    return ServerLimits(int(max_connections), int(reserved), int(in_use))
