"""Base of event-sourced aggregates: state changes only by applying events (pure Python)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self

from magasin.shared import state as codec

_BOOKKEEPING = frozenset({"id", "version", "pending"})


class Aggregate(ABC):
    """Subclasses name their stream type and implement `apply` (a `match` over events).

    Commands validate, then call `_record(event)`, which applies the event and keeps it as
    pending until the repository stores it. `version` is the stream version of the last
    stored event.
    """

    stream_type: ClassVar[str]
    snapshot_version: ClassVar[int] = 1
    """Version of the state's shape in snapshots: bump it whenever the attributes of the
    class change meaning, so that snapshots taken before are ignored rather than misread."""

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
        # What copy.copy does for a plain class, without its protocol lookups (a handler
        # clones some ten aggregates a sale from the repository's cache).
        twin = object.__new__(type(self))
        state = dict(vars(self))
        for name, value in state.items():
            if isinstance(value, list):
                state[name] = list(value)
        vars(twin).update(state)
        return twin

    def replay_more(self, events: Iterable[object], version: int) -> None:
        """Bring a loaded aggregate up to `version` with the events stored after it."""
        for event in events:
            self.apply(event)
        self.version = version

    def state(self) -> dict[str, Any]:
        """The state as plain JSON data (attributes and public properties), for people."""
        view: dict[str, Any] = {"id": self.id, "version": self.version}
        for name, value in vars(self).items():
            if name not in _BOOKKEEPING and not name.startswith("_"):
                view[name] = codec.plain(value)
        for klass in reversed(type(self).__mro__):
            for name, member in vars(klass).items():
                if isinstance(member, property) and not name.startswith("_"):
                    view[name] = codec.plain(getattr(self, name))
        return view

    def snapshot(self) -> dict[str, Any]:
        """The state in a form `from_snapshot` restores exactly (see shared/state.py)."""
        return {name: codec.encode(value) for name, value in vars(self).items()
                if name not in _BOOKKEEPING}

    @classmethod
    def from_snapshot(cls, ident: str, version: int, data: Mapping[str, Any]) -> Self:
        """The aggregate as `snapshot()` saw it at `version`. ValueError when the data does
        not have exactly the attributes of this class (a shape the class no longer has)."""
        aggregate = cls(ident)
        expected = set(vars(aggregate)) - _BOOKKEEPING
        if set(data) != expected:
            raise ValueError(
                f"snapshot of {cls.stream_type} {ident} has attributes {sorted(data)}, "
                f"expected {sorted(expected)}"
            )
        try:
            for name, value in data.items():
                setattr(aggregate, name, codec.decode(value))
        except (TypeError, ValueError, AttributeError, ImportError) as exc:
            raise ValueError(f"snapshot of {cls.stream_type} {ident} cannot be read: {exc}") \
                from exc
        aggregate.version = version
        return aggregate

    @classmethod
    def replay(cls, ident: str, events: Iterable[object], version: int) -> Self:
        aggregate = cls(ident)
        for event in events:
            aggregate.apply(event)
        aggregate.version = version
        return aggregate
