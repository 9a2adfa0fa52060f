"""Which coordination runs a sale: deployment mode and the hybrid rule."""

from __future__ import annotations

import pytest

from magasin.config import Settings
from magasin.shared.errors import InvalidInput
from magasin.transactions.orchestrator.routing import Mode, Routing


def test_default_is_choreography_for_every_sale() -> None:
    routing = Routing.from_settings(Settings().saga_mode, Settings().saga_orchestrate)
    assert routing.mode_for("S1", "card", 10**9) is Mode.CHOREOGRAPHY


def test_orchestration_mode_orchestrates_every_sale() -> None:
    routing = Routing.from_settings("orchestration", "")
    assert routing.mode_for("S1", "cash", 1) is Mode.ORCHESTRATION


@pytest.mark.parametrize(("store", "method", "total", "mode"), [
    ("S1", "cash", 100, Mode.ORCHESTRATION),
    ("S2", "card", 100, Mode.ORCHESTRATION),
    ("S2", "cash", 501, Mode.ORCHESTRATION),
    ("S2", "cash", 500, Mode.CHOREOGRAPHY),
    ("S2", "gift", 10, Mode.CHOREOGRAPHY),
])
def test_hybrid_rule_orchestrates_sales_matching_any_term(
    store: str, method: str, total: int, mode: Mode
) -> None:
    routing = Routing.from_settings("choreography", "store:S1, method:card,amount_over:500")
    assert routing.mode_for(store, method, total) is mode


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGASIN_SAGA_MODE", "orchestration")
    monkeypatch.setenv("MAGASIN_SAGA_ORCHESTRATE", "store:S9")
    settings = Settings()
    assert (settings.saga_mode, settings.saga_orchestrate) == ("orchestration", "store:S9")


@pytest.mark.parametrize("rule", ["store", "store:", "colour:red", "amount_over:lots"])
def test_a_malformed_rule_is_refused(rule: str) -> None:
    with pytest.raises(InvalidInput):
        Routing.from_settings("choreography", rule)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidInput):
        Routing.from_settings("telepathy", "")
