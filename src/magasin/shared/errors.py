"""The one error tree of magasin; adapters translate driver errors into it.

    MagasinError
    ├── NotFound
    ├── Conflict
    │   ├── ConcurrencyError        wrong expected version on append
    │   ├── DuplicateEventError     a batch mixing already-stored and new event ids
    │   └── AlreadyProcessed        inbox: this consumer already handled that event
    ├── BusinessRuleViolation
    ├── InvalidInput
    │   └── MalformedMessage        bad JSON, unknown event type or invalid payload
    ├── Unavailable                 a server (database, broker, bank) cannot be reached
    ├── StorageError                any other failure reported by a storage driver
    └── ConfigurationError          a setting or declaration refused at start-up
"""

from __future__ import annotations


class MagasinError(Exception):
    """Base of every error magasin raises on purpose."""


class NotFound(MagasinError):
    """The thing asked for does not exist."""


class Conflict(MagasinError):
    """The request conflicts with the current state."""


class ConcurrencyError(Conflict):
    """An append's expected version did not match the stream's version."""

    def __init__(self, stream_id: str, expected: int | None, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, expected {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventError(Conflict):
    """A batch holds some event ids that are already stored and some that are not."""


class AlreadyProcessed(Conflict):
    """The inbox already holds this (consumer, event id): the effects happened once."""

    def __init__(self, consumer: str, event_id: str) -> None:
        super().__init__(f"consumer {consumer!r} already processed event {event_id}")
        self.consumer = consumer
        self.event_id = event_id


class BusinessRuleViolation(MagasinError):
    """A command was refused by a domain rule."""


class InvalidInput(MagasinError):
    """Input (HTTP or message) is not acceptable."""


class MalformedMessage(InvalidInput):
    """A message cannot be decoded: bad JSON, unknown event type or invalid payload."""


class Unavailable(MagasinError):
    """A server needed to answer cannot be reached right now."""


class StorageError(MagasinError):
    """A storage driver failed for a reason that is not one of the above."""


class ConfigurationError(MagasinError):
    """A setting or declaration that cannot work, refused at start-up rather than at the
    first message it would lose."""
