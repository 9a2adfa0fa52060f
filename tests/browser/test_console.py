"""The operator console in a real browser against a real `magasin up`: sign in, live sales,
a sale's timeline and replay, a compensation, a dead letter requeued and handled, stock,
the event store, health, a phone's width, and the audit chain turning red when a row is
tampered with (last: it breaks the chain for good)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from tests.browser.conftest import DESKTOP, PHONE, Console, Magasin, magasin_up
from tests.conftest import IN_CI

pytestmark = pytest.mark.browser

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError:
    if IN_CI:  # CI=true: the browser tests run, never skip
        raise
    pytest.skip("Playwright is not installed: `make install`", allow_module_level=True)

TRACE_URL = "http://traces.invalid/trace/{trace_id}"


@pytest.fixture(scope="module")
def magasin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Magasin]:
    # Tracing on (spans printed to the log) so that sales carry a trace id to link to.
    with magasin_up(
        tmp_path_factory.mktemp("console"), {"OTEL_TRACES_EXPORTER": "console"},
        bank_latency_ms="100", retry_attempts="2", retry_initial_delay="0.05",
        metrics_sample_s="1", trace_url=TRACE_URL,
    ) as running:
        yield running


@pytest.fixture
def desk(browser: Browser, magasin: Magasin) -> Iterator[Console]:
    tab = Console(browser, magasin, DESKTOP)
    yield tab
    tab.close()


@pytest.fixture
def phone(browser: Browser, magasin: Magasin) -> Iterator[Console]:
    tab = Console(browser, magasin, PHONE)
    yield tab
    tab.close()


def row_of(page: Page, sale: str) -> Any:
    return page.locator(f'tr[data-testid="sale-row"][data-id="{sale}"]')


def test_sign_in_refuses_a_wrong_key_then_opens_with_the_keyboard(desk: Console) -> None:
    page = desk.page
    page.goto(f"{desk.magasin.url}/console/")
    page.locator("#api-key").fill("not-a-key")
    page.locator("#api-key").press("Enter")
    expect(page.get_by_test_id("signin-error")).to_contain_text("This key was refused")
    desk.shot("01-sign-in-refused")
    page.locator("#api-key").fill("")

    desk.open()
    expect(page.get_by_test_id("identity")).to_have_text("operator key")
    # Every section is reachable with Tab from the top of the page.
    page.locator("body").focus()
    reached = []
    for _ in range(25):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.textContent.trim()"))
    for section in ("Sales", "Stock", "Dead letters", "Stuck sagas", "Event store", "Audit",
                    "Health"):
        assert section in reached, reached
    desk.shot("02-signed-in")


def test_a_new_sale_reaches_completed_live_without_a_reload(
    desk: Console, magasin: Magasin
) -> None:
    page = desk.open()
    expect(page.get_by_test_id("stream-state")).to_have_text("● live")
    page.evaluate("window.notReloaded = true")
    box = page.locator(".sales-box").bounding_box()
    filters = page.locator("form.filters").bounding_box()

    sale = magasin.sell()
    expect(row_of(page, sale)).to_have_attribute("data-status", "COMPLETED", timeout=20_000)

    assert page.evaluate("window.notReloaded") is True
    # Rows arrive inside a box of fixed size: nothing around them moved.
    assert page.locator(".sales-box").bounding_box() == box
    assert page.locator("form.filters").bounding_box() == filters
    expect(page.get_by_test_id("stat-completed")).not_to_have_text("–")
    desk.shot("03-live-sales")


def test_the_live_sales_fit_a_phone(phone: Console, magasin: Magasin) -> None:
    page = phone.open()
    sale = magasin.sell()
    expect(row_of(page, sale)).to_have_attribute("data-status", "COMPLETED", timeout=20_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.shot("04-live-sales")


def test_a_sale_timeline_shows_every_service_and_replays_the_sale_from_its_creation(
    desk: Console, magasin: Magasin
) -> None:
    sale = magasin.sell()
    page = desk.open()
    expect(row_of(page, sale)).to_have_attribute("data-status", "COMPLETED", timeout=20_000)
    row_of(page, sale).get_by_role("link").click()

    timeline = page.get_by_test_id("timeline")
    expect(timeline.get_by_test_id("sale-status")).to_have_text("COMPLETED")
    events = timeline.get_by_test_id("event-row")
    for kind, service in (("TransactionCreated", "transaction"), ("PaymentProcessed", "payment"),
                          ("InventoryReserved", "inventory"), ("OrderFulfilled", "store"),
                          ("TransactionCompleted", "transaction")):
        expect(events.and_(page.locator(f'[data-type="{kind}"]'))).to_contain_text(service)
    assert page.locator("tr.compensation, tr.failure").count() == 0
    trace = timeline.get_by_test_id("trace").get_by_role("link")
    expect(trace).to_have_attribute("href", re.compile(r"^http://traces\.invalid/trace/[0-9a-f]{32}$"))

    # The sale's own stream: its creation, then its completion (a choreographed sale learns
    # its payment and reservation from the store's OrderFulfilled).
    slider = timeline.get_by_test_id("replay-slider")
    expect(timeline.get_by_test_id("replay-status")).to_have_text("COMPLETED")
    slider.focus()
    page.keyboard.press("Home")
    expect(timeline.get_by_test_id("replay-status")).to_have_text("PENDING")
    expect(timeline.get_by_test_id("replay")).to_contain_text("TransactionCreated")
    desk.shot("05-timeline-replayed-to-creation")
    page.keyboard.press("ArrowRight")
    expect(timeline.get_by_test_id("replay-status")).to_have_text("COMPLETED")
    expect(timeline.get_by_test_id("replay")).to_contain_text("TransactionCompleted")


def test_a_declined_card_shows_its_compensation(desk: Console, magasin: Magasin) -> None:
    sale = magasin.sell(payment_method="FAIL_CARD")
    desk.open()
    page = desk.go(f"sale/{sale}")
    timeline = page.get_by_test_id("timeline")
    expect(timeline.get_by_test_id("sale-status")).to_have_text("CANCELLED", timeout=20_000)
    expect(timeline).to_contain_text("declined")
    expect(page.locator('tr.failure[data-type="PaymentFailed"]')).to_have_count(1)
    expect(page.locator('tr.compensation[data-type="TransactionCancelled"]')).to_have_count(1)
    expect(page.locator('tr.compensation[data-type="CompensationStarted"]')).to_have_count(1)
    desk.shot("06-timeline-compensated")


class Hook(BaseHTTPRequestHandler):
    """A sale's callback endpoint: 500 until `fixed`, then 200."""

    fixed: ClassVar[bool] = False
    answered: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 200 if Hook.fixed else 500
        Hook.answered.append(status)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/sales"
    finally:
        server.shutdown()


def test_a_poisoned_dead_letter_is_requeued_and_seen_handled(
    desk: Console, magasin: Magasin, hook: str
) -> None:
    page = desk.open()
    page = desk.go("dead-letters")
    expect(page.get_by_test_id("dl-empty")).to_be_visible()
    sale = magasin.sell(callback_url=hook)  # its notification fails every attempt

    row = page.get_by_test_id("dl-row").filter(has_text="transaction.notifier")
    expect(row).to_have_attribute("data-outcome", "pending", timeout=20_000)
    row.get_by_role("button", name="View").click()
    detail = page.get_by_test_id("dl-detail")
    expect(detail).to_contain_text("HTTPStatusError")
    expect(detail).to_contain_text(sale)
    desk.shot("07-dead-letter-pending")

    Hook.fixed = True
    row.get_by_test_id("dl-requeue").click()
    expect(row).to_have_attribute("data-outcome", "handled", timeout=20_000)
    expect(row.get_by_test_id("dl-outcome")).to_have_text("handled ✓")
    assert Hook.answered[-1] == 200
    desk.shot("08-dead-letter-handled")


def test_stock_shows_each_product_and_takes_a_restock(desk: Console, magasin: Magasin) -> None:
    desk.open()
    page = desk.go("stock")
    store, coffee = magasin.shelf()
    row = page.locator(f'tr[data-testid="stock-row"][data-product="{coffee}"]')
    expect(row).to_contain_text("Café filtre 1 kg")
    before = magasin.api("GET", f"/api/stock/{store}/{coffee}")["on_hand"]
    row.get_by_role("spinbutton").fill("7")
    row.get_by_role("button", name="Add").click()
    expect(page.get_by_test_id("note")).to_contain_text("Added 7")
    expect(row.locator("td").nth(1)).to_have_text(str(before + 7))
    assert magasin.api("GET", f"/api/stock/{store}/{coffee}")["on_hand"] == before + 7
    desk.shot("09-stock")


def test_the_event_store_filters_by_correlation_id_and_reads_state_as_of(
    desk: Console, magasin: Magasin
) -> None:
    sale = magasin.sell()
    desk.open()
    page = desk.go("events")
    expect(page.get_by_test_id("event-log-row").first).to_be_visible()
    page.get_by_label("Correlation id").fill(sale)
    page.get_by_test_id("events-search").click()
    rows = page.get_by_test_id("event-log-row")
    expect(rows.filter(has_text="TransactionCreated")).to_have_count(1, timeout=10_000)
    rows.filter(has_text="TransactionCreated").get_by_role("button").click()
    expect(page.get_by_test_id("event-json")).to_contain_text(sale)

    page.get_by_role("textbox", name="As of").fill("2099-01-01T00:00:00")
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_test_id("as-of")).to_contain_text("sales")
    desk.shot("10-event-store")


def test_health_shows_services_breaker_and_projections(desk: Console) -> None:
    desk.open()
    page = desk.go("health")
    process = page.get_by_test_id("process-magasin")
    expect(process).to_contain_text("transaction, payment, inventory, store, audit, eventstore")
    expect(process.get_by_test_id("breaker")).to_contain_text("closed")
    expect(process).to_contain_text("transaction.transactions")
    # Issue 12: every consumer's partitions, with their owner and depth.
    expect(process.get_by_test_id("partitions")).to_contain_text("owner")
    expect(process.get_by_test_id("partitions")).to_contain_text("transaction.catalog")
    desk.shot("11-health")


LOADED = {
    "stock": '[data-testid="stock-row"]', "dead-letters": '[data-testid="dl-row"]',
    "sagas": '[data-testid="sagas-empty"]:visible, [data-testid="saga-row"]',
    "events": '[data-testid="event-log-row"]', "audit": '[data-testid="verify"]',
    "health": '[data-testid="process-magasin"]',
}
"""What shows once a section has its data (the sections before left some of each)."""


@pytest.mark.parametrize("section", list(LOADED))
def test_every_section_fits_a_phone(phone: Console, section: str) -> None:
    phone.open()
    page = phone.go(section)
    page.locator(LOADED[section]).first.wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], section
    phone.shot(f"12-phone-{section}")


def test_audit_verifies_green_then_red_after_a_tampered_row(
    desk: Console, magasin: Magasin
) -> None:
    desk.open()
    page = desk.go("audit")
    page.get_by_test_id("verify").click()
    verdict = page.get_by_test_id("verdict")
    expect(verdict).to_have_attribute("data-ok", "true")
    expect(verdict).to_contain_text("Chain intact.")
    desk.shot("13-audit-green")

    magasin.tamper(
        "UPDATE documents SET body = json_set(body, '$.payload.amount', 1) "
        "WHERE collection = 'audit.entries' AND key = '000000000003'", (),
    )
    page.get_by_test_id("verify").click()
    expect(verdict).to_have_attribute("data-ok", "false")
    expect(verdict).to_contain_text("Chain broken.")
    expect(verdict).to_contain_text("#3")
    expect(verdict).to_contain_text("modified")
    desk.shot("14-audit-red")

