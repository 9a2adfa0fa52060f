"""Which coordination runs a sale: the deployment's mode, or the hybrid rule.

`MAGASIN_SAGA_MODE=choreography|orchestration` is the default for every sale;
`MAGASIN_SAGA_ORCHESTRATE="store:S1,method:card,amount_over:500"` sends any sale that
matches one of its terms to the orchestrator even in choreography mode (for example the
high-value sales that need one place to follow them). The mode is decided once, when the
sale is created, and recorded with it: changing the setting later never moves a sale that
is in flight to the other coordination.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from magasin.shared.errors import InvalidInput

SAGA_MODE = "saga_mode"
"""Key of the mode in the `baggage` metadata every event of an orchestrated saga carries."""


class Mode(StrEnum):
    CHOREOGRAPHY = "choreography"
    ORCHESTRATION = "orchestration"


@dataclass(frozen=True)
class Rule:
    """Terms of the hybrid rule; a sale matching any of them is orchestrated."""

    stores: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    amount_over: int | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        stores: set[str] = set()
        methods: set[str] = set()
        amount_over: int | None = None
        for term in filter(None, (t.strip() for t in text.split(","))):
            kind, sep, value = term.partition(":")
            value = value.strip()
            if not sep or not value:
                raise InvalidInput(f"saga rule term {term!r} is not kind:value")
            match kind.strip():
                case "store":
                    stores.add(value)
                case "method":
                    methods.add(value)
                case "amount_over":
                    if not value.isdigit():
                        raise InvalidInput(f"saga rule amount_over:{value} is not an amount")
                    amount_over = int(value)
                case other:
                    raise InvalidInput(
                        f"saga rule kind {other!r} is not store, method or amount_over"
                    )
        return cls(frozenset(stores), frozenset(methods), amount_over)

    def matches(self, store_id: str, payment_method: str, total: int) -> bool:
        return (store_id in self.stores or payment_method in self.methods
                or (self.amount_over is not None and total > self.amount_over))


@dataclass(frozen=True)
class Routing:
    default: Mode = Mode.CHOREOGRAPHY
    rule: Rule = Rule()

    @classmethod
    def from_settings(cls, mode: str, orchestrate: str) -> Routing:
        try:
            default = Mode(mode)
        except ValueError:
            raise InvalidInput(
                f"saga mode {mode!r} is not choreography or orchestration"
            ) from None
        return cls(default, Rule.parse(orchestrate))

    def mode_for(self, store_id: str, payment_method: str, total: int) -> Mode:
        if self.rule.matches(store_id, payment_method, total):
            return Mode.ORCHESTRATION
        return self.default
