"""Read models as projections of a service's own event log, with checkpoints, lag and rebuild.

A `Projection` is a name, an explicit registry `{event type: async handler}` and the
document collections it owns. A `ProjectionRunner` tails the log and commits each batch's
documents in the same unit of work as the projection's checkpoint; `rebuild` projects the
whole log into shadow collections and swaps them in atomically; `lags` says how far behind
each projection is.
"""

from magasin.projections.lag import ProjectionLag, lags
from magasin.projections.projection import Projection, ProjectionHandler, ProjectionUnit
from magasin.projections.rebuild import RebuildReport, rebuild
from magasin.projections.runner import ProjectionRunner, catch_up, fresh

__all__ = [
    "Projection",
    "ProjectionHandler",
    "ProjectionLag",
    "ProjectionRunner",
    "ProjectionUnit",
    "RebuildReport",
    "catch_up",
    "fresh",
    "lags",
    "rebuild",
    "rebuild_throughput",
]


def rebuild_throughput(kind: str, projection: Projection) -> float:
    """Events per second of a full rebuild of `projection` (for bench/replay.py: the
    transactions projection) over a generated saga log (`kind`: "sqlite" or "postgres")."""
    from magasin.projections.bench import rebuild_throughput as measure

    return measure(kind, projection)
