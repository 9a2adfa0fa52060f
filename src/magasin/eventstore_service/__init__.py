"""The event store service: browse the log, replay aggregates, read any state as of a moment."""
