"""The event bus: publish envelopes, deliver them to named consumers exactly-once in effect."""

from magasin.messaging.bus import DeadLetter, EventBus, Handler, RetryPolicy

__all__ = ["DeadLetter", "EventBus", "Handler", "RetryPolicy"]
