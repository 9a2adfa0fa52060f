"""Base of event-sourced aggregates: state changes only by applying events (pure Python)."""

from __future__ import annotations

import copy
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

    def clone(self) -> Self:
        """A copy that can change without changing this one. Aggregate state holds immutable
        values (scalars, tuples of frozen dataclasses) and lists, which are copied."""
        twin = copy.copy(self)
        for name, value in vars(twin).items():
            if isinstance(value, list):
                setattr(twin, name, list(value))
        return twin

    def replay_more(self, events: Iterable[object], version: int) -> None:
        """Bring a loaded aggregate up to `version` with the events stored after it."""
        for event in events:
            self.apply(event)
        self.version = version

    @classmethod
    def replay(cls, ident: str, events: Iterable[object], version: int) -> Self:
        aggregate = cls(ident)
        for event in events:
            aggregate.apply(event)
        aggregate.version = version
        return aggregate
