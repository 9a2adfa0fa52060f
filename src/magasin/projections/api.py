"""HTTP view of the projections this process runs: checkpoint, head and lag of each."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from magasin.eventstore.store import EventStore
from magasin.projections.lag import lags


class ProjectionView(BaseModel):
    name: str
    checkpoint: int
    head: int
    lag_events: int
    lag_seconds: float
    status: str


def router(store: EventStore) -> APIRouter:
    api = APIRouter(prefix="/api/projections", tags=["projections"])

    @api.get("", response_model=list[ProjectionView])
    async def list_projections() -> list[ProjectionView]:
        """Each read model's position in this service's log and how far behind it is."""
        return [ProjectionView.model_validate(lag.as_dict()) for lag in await lags(store)]

    return api
