"""Browser tests of the console: Playwright for Python drives Debian's Chromium against a
real `magasin up` process on a free port; each test saves a screenshot of what it checked
under MAGASIN_TEST_ARTIFACTS (default `test-artifacts/`), in `console/`.

`playwright install` cannot download a browser here: `scripts/ensure-browser.sh` (run by
`make test`) installs Debian's `chromium`. With CI=true a missing browser fails the tests;
elsewhere they are skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import IN_CI
from tests.e2e.processes import ServiceProcess, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("MAGASIN_TEST_ARTIFACTS") or "test-artifacts") / "console"
KEY = "console-operator-key"
ADMIN_KEY = "console-admin-key"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}


def _missing(what: str) -> None:
    message = f"{what}: the console's browser tests cannot run"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: they must run; `make test` installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one module. Not longer: Playwright's sync API keeps an event loop
    running in this thread while it is open, and the async tests of other modules need
    the thread free."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _missing(f"Playwright is not installed ({exc}; `make install`)")
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is missing (scripts/ensure-browser.sh)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Magasin:
    """A running `magasin up` and an HTTP client of its API."""

    url: str
    data_dir: Path
    process: ServiceProcess

    def api(self, method: str, path: str, key: str = KEY, **kw: Any) -> Any:
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as client:
            response = client.request(method, path, headers={"X-API-Key": key}, **kw)
        assert response.status_code < 300, (method, path, response.status_code, response.text)
        return response.json()

    def shelf(self) -> tuple[str, str]:
        """The first demo store and its coffee."""
        store = self.api("GET", "/api/stores")["items"][0]["store_id"]
        products = self.api("GET", "/api/products", params={"limit": 500})["items"]
        coffee = next(p["product_id"] for p in products if p["sku"] == "CAF-001")
        return store, coffee

    def sell(self, payment_method: str = "VISA", **extra: Any) -> str:
        store, coffee = self.shelf()
        body = {"store_id": store, "customer_id": "console-test", "payment_method": payment_method,
                "items": [{"product_id": coffee, "quantity": 1}], **extra}
        sale: str = self.api("POST", "/api/transactions", json=body)["transaction_id"]
        return sale

    def tamper(self, sql: str, args: tuple[Any, ...]) -> None:
        """Change the database behind magasin's back, as an intruder would."""
        with sqlite3.connect(self.data_dir / "magasin.db", timeout=10) as conn:
            conn.execute(sql, args)


@contextlib.contextmanager
def magasin_up(
    workdir: Path, extra_env: Mapping[str, str] | None = None, **settings: str
) -> Iterator[Magasin]:
    """`magasin up` (demo stores, catalog and stock) with `settings` (MAGASIN_* without the
    prefix) and `extra_env`, on a free port; stopped afterwards."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAGASIN_", "OTEL_"))}
    env.update(extra_env or {})
    data_dir = workdir / "var"
    env.update({
        "MAGASIN_DATA_DIR": str(data_dir), "MAGASIN_API_KEYS": KEY,
        "MAGASIN_ADMIN_API_KEYS": ADMIN_KEY, "MAGASIN_LOG_FORMAT": "console",
        **{f"MAGASIN_{name.upper()}": value for name, value in settings.items()},
    })
    process = ServiceProcess("magasin", free_port(), env, workdir / "magasin.log",
                             Path.cwd())
    process.command = ["up"]
    process.start()
    try:
        process.wait_healthy(timeout=60)
        yield Magasin(process.url, data_dir, process)
    finally:
        process.terminate()


class Console:
    """One browser tab on the console, signed in with a key; collects script errors."""

    def __init__(self, browser: Browser, magasin: Magasin, viewport: dict[str, int]) -> None:
        self.magasin = magasin
        self.context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.width = viewport["width"]

    def open(self, key: str = KEY) -> Page:
        page = self.page
        page.goto(f"{self.magasin.url}/console/")
        page.locator("#api-key").wait_for()
        # The key field has the focus: the keyboard alone signs in.
        page.keyboard.type(key)
        page.keyboard.press("Enter")
        page.get_by_test_id("identity").wait_for()
        return page

    def go(self, section: str) -> Page:
        self.page.goto(f"{self.magasin.url}/console/#/{section}")
        return self.page

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}-{self.width}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], f"script errors in the page: {self.errors}"
