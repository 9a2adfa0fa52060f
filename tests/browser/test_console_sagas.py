"""Stuck sagas in the console: a sale the bank does not answer waits for its order (a
choreographed sale's one step); a plain key sees it with no way to force it, an admin key
forces its compensation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser.conftest import ADMIN_KEY, DESKTOP, Console, Magasin, magasin_up
from tests.conftest import IN_CI

pytestmark = pytest.mark.browser

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError:
    if IN_CI:  # CI=true: the browser tests run, never skip
        raise
    pytest.skip("Playwright is not installed: `make install`", allow_module_level=True)


@pytest.fixture(scope="module")
def magasin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Magasin]:
    # The bank takes a minute to answer and the deadlines are far: sales wait for their
    # order for as long as the test needs.
    with magasin_up(tmp_path_factory.mktemp("sagas"), bank_latency_ms="60000",
                    deadline_payment_s="600", deadline_order_s="600") as running:
        yield running


def stuck_sagas(tab: Console, key: str | None = None) -> Page:
    if key is None:
        tab.open()
    else:
        tab.open(key)
    page = tab.go("sagas")
    older = page.get_by_test_id("older-than")
    older.fill("0")
    older.press("Enter")
    return page


def test_a_plain_key_sees_a_stuck_saga_but_no_button_to_force_it(
    browser: Browser, magasin: Magasin
) -> None:
    sale = magasin.sell()
    tab = Console(browser, magasin, DESKTOP)
    try:
        page = stuck_sagas(tab)
        row = page.locator(f'[data-testid="saga-row"][data-id="{sale}"]')
        expect(row).to_contain_text("PENDING")
        expect(row).to_contain_text("order")
        expect(page.get_by_test_id("force-compensation")).to_have_count(0)
        expect(page.get_by_test_id("not-admin")).to_be_visible()
        tab.shot("15-stuck-saga-plain-key")
    finally:
        tab.close()


def test_an_admin_key_forces_the_compensation_of_a_stuck_saga(
    browser: Browser, magasin: Magasin
) -> None:
    sale = magasin.sell()
    tab = Console(browser, magasin, DESKTOP)
    try:
        page = stuck_sagas(tab, ADMIN_KEY)
        expect(page.get_by_test_id("identity")).to_have_text("admin key")
        row = page.locator(f'[data-testid="saga-row"][data-id="{sale}"]')
        button = row.get_by_test_id("force-compensation")
        expect(button).to_have_text("Force compensation")
        button.click()
        expect(button).to_have_text("Confirm: compensate now")  # a second, deliberate click
        button.click()

        expect(page.get_by_test_id("note")).to_contain_text("Compensating")
        expect(row).to_contain_text("CANCELLING")
        # It now waits for its compensation, which has a deadline and can be forced again.
        expect(row).to_contain_text("compensation")
        saga = magasin.api("GET", f"/api/sagas/{sale}")
        assert saga["status"] in ("CANCELLING", "CANCELLED")
        assert saga["reason"] == "forced"
        tab.shot("16-stuck-saga-forced")
    finally:
        tab.close()
