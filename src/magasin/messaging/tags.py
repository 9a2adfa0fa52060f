"""Routing tags: facts of an event's flow that a consumer may require to get it at all.

An event's tags are the entries of its `baggage` metadata (facts about the whole flow,
which every event a handler writes inherits from the event it handles, see
`Causation.of`), each as one word `key=value`, sorted. A consumer subscribed with
`requires=<tag>` is meant only for the events carrying that tag, and the others never
reach it: the in-process bus does not dispatch them to it (no handler run, no inbox mark;
its checkpoint moves over them lazily, as over types it does not handle), and on RabbitMQ
the tags are extra routing-key words after the partition,
`<aggregate>.<EventType>.<partition>[.<tag>...]`, so that the consumer's queues, bound to
`*.<EventType>.<partition>.#.<tag>.#` instead of `*.<EventType>.<partition>.#`, are never
sent the others (`#` stands for zero or more words).

A tag is one routing-key word: letters, digits and `_ - : = +`, never `.`, `*` or `#`.
A baggage entry that would not make one (a value with a dot, say) is not a tag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

BAGGAGE = "baggage"
"""The metadata entry the tags come from."""

_WORD = re.compile(r"[A-Za-z0-9_\-:=+]{1,100}")


def tag(key: str, value: str) -> str:
    """The tag an event whose baggage has `key: value` carries; ValueError if it cannot be
    one routing-key word."""
    return check_tag(f"{key}={value}")


def check_tag(word: str) -> str:
    if not _WORD.fullmatch(word):
        raise ValueError(
            f"routing tag {word!r} must be one routing-key word of letters, digits, _-:=+"
        )
    return word


def tags_of(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    """The routing tags of an event with this metadata, sorted (none without baggage)."""
    baggage = metadata.get(BAGGAGE)
    if not isinstance(baggage, Mapping) or not baggage:
        return ()
    words = {f"{key}={value}" for key, value in baggage.items()
             if isinstance(key, str) and isinstance(value, str)}
    return tuple(sorted(w for w in words if _WORD.fullmatch(w)))


def carries(metadata: Mapping[str, Any], required: str | None) -> bool:
    """Whether an event with this metadata is meant for a consumer requiring `required`
    (a checked tag): `required in tags_of(metadata)`, without building them all."""
    if required is None:
        return True
    baggage = metadata.get(BAGGAGE)
    return isinstance(baggage, Mapping) and any(
        isinstance(key, str) and isinstance(value, str) and f"{key}={value}" == required
        for key, value in baggage.items())


def routing_key(event_key: str, partition: int, tags: tuple[str, ...]) -> str:
    """`<aggregate>.<EventType>.<partition>`, then the tags, the broker's routing key."""
    return ".".join((event_key, str(partition), *tags))


class Routed(NamedTuple):
    """What a routing key built by `routing_key` says."""

    aggregate: str
    event_type: str
    partition: int

    @property
    def event_key(self) -> str:
        """`<aggregate>.<EventType>`, the key the event was published under."""
        return f"{self.aggregate}.{self.event_type}"


def routed(key: str | None) -> Routed | None:
    """The aggregate, event type and partition of a routing key built by `routing_key`;
    None for any other (a key the dead-letter or retry path set, say)."""
    words = (key or "").split(".")
    if len(words) < 3 or not words[2].isdigit():
        return None
    return Routed(words[0], words[1], int(words[2]))


def untagged_binding_key(event_type: str, partition: int) -> str:
    """How partition queues were bound before routing tags: tagged keys do not match it."""
    return f"*.{event_type}.{partition}"


def binding_key(event_type: str, partition: int, required: str | None) -> str:
    """What binds a consumer's partition queue to one event type: every tag or none
    (`.#` matches zero words too), or only the routing keys with the required tag."""
    base = f"*.{event_type}.{partition}.#"
    return base if required is None else f"{base}.{required}.#"
