"""Base of event-sourced aggregates: state changes only by applying events (pure Python)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar, Self


class Aggregate(ABC):
    """Subclasses name their stream type and implement `apply` (a `match` over events).

    Commands validate, then call `_record(event)`, which applies the event and keeps it as
    pending until the repository stores it. `version` is the stream version of the last
    stored event.
    """

    stream_type: ClassVar[str]

    def __init__(self, ident: str) -> None:
        self.id = ident
        self.version = 0
        self.pending: list[object] = []

    @abstractmethod
    def apply(self, event: object) -> None:
        """Change state for one event; must not fail for an event it recorded itself."""

    def _record(self, event: object) -> None:
        self.apply(event)
        self.pending.append(event)

    @classmethod
    def replay(cls, ident: str, events: Iterable[object], version: int) -> Self:
        aggregate = cls(ident)
        for event in events:
            aggregate.apply(event)
        aggregate.version = version
        return aggregate
