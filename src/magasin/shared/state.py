"""Aggregate state as data: a plain JSON view for people, and a tagged form for snapshots.

The tagged form keeps what JSON loses (tuples, enums, datetimes, frozen dataclasses) so a
snapshot decodes to exactly the values the aggregate held. Only classes of magasin's own
modules are ever rebuilt from a snapshot, never an arbitrary name found in the data.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from datetime import datetime
from typing import Any


def plain(value: Any) -> Any:
    """JSON-ready data a person reads: enums as their value, instants as ISO-8601."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return str(value)


def _name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value: Any) -> Any:
    """The tagged JSON form of a state value; TypeError for a value it cannot keep."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return {"$enum": _name(type(value)), "value": encode(value.value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"$data": _name(type(value)),
                "fields": {f.name: encode(getattr(value, f.name))
                           for f in dataclasses.fields(value)}}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"$set" if isinstance(value, set) else "$frozenset": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"$dict": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"cannot keep a {type(value).__name__} in a snapshot")


def _resolve(name: str) -> type:
    module, _, qualname = name.partition(":")
    if module != "magasin" and not module.startswith("magasin."):
        raise ValueError(f"a snapshot names {name!r}, outside magasin")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise ValueError(f"{name!r} is not a class")
    return found


def decode(data: Any) -> Any:
    """The value `encode` was given; ValueError (or TypeError) if the data does not fit."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict) or len(data) > 2:
        raise ValueError(f"not a tagged snapshot value: {data!r}")
    if "$tuple" in data:
        return tuple(decode(v) for v in data["$tuple"])
    if "$datetime" in data:
        return datetime.fromisoformat(data["$datetime"])
    if "$enum" in data:
        cls = _resolve(data["$enum"])
        if not issubclass(cls, enum.Enum):
            raise ValueError(f"{data['$enum']} is not an enum")
        return cls(decode(data["value"]))
    if "$data" in data:
        cls = _resolve(data["$data"])
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{data['$data']} is not a dataclass")
        return cls(**{k: decode(v) for k, v in data["fields"].items()})
    if "$set" in data:
        return {decode(v) for v in data["$set"]}
    if "$frozenset" in data:
        return frozenset(decode(v) for v in data["$frozenset"])
    if "$dict" in data:
        return {decode(k): decode(v) for k, v in data["$dict"]}
    raise ValueError(f"not a tagged snapshot value: {data!r}")
