"""The web page in a real headless Chromium (Python Playwright): log in, classify, change options,
reload, see the history. Skipped, saying what to install, where Chromium or Playwright is missing.

Leaves a full-page screenshot in tests/artifacts/browser.png.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATA, RunningServer

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
CAT_LABEL = re.compile(r"^(tabby|tiger cat|Egyptian cat)$", re.IGNORECASE)
COFFEE_LABEL = re.compile(r"^(espresso|cup|coffee mug)$", re.IGNORECASE)

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None,
                       reason="browser test needs the Python package playwright: .venv/bin/pip install playwright "
                              "(never `playwright install`; the test uses the system Chromium)"),
    pytest.mark.skipif(not CHROMIUM.exists() and not shutil.which("chromium"),
                       reason="browser test needs Chromium at /usr/bin/chromium: apt-get install -y chromium"),
    pytest.mark.timeout(90),
]


@pytest.fixture
def page(server: RunningServer):
    executable = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            pytest.skip(f"Chromium at {executable} does not start headless: {exc}")
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(15_000)
            page = context.new_page()
            page.problems = []  # console errors (CSP violations among them) and uncaught exceptions
            page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
            page.on("pageerror", lambda error: page.problems.append(str(error)))
            yield page
        finally:
            browser.close()


def test_log_in_classify_change_options_reload(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    expect(page.get_by_test_id("file-input")).to_be_disabled()

    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    expect(page.get_by_label("Top k")).to_have_value("5")

    # The cat: its card shows a cat as the top label, with five bars.
    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    cat_card = page.locator("[data-testid=result-card][data-filename='cat.jpg']")
    expect(cat_card).to_have_attribute("data-state", "done")
    expect(cat_card.get_by_test_id("result-top-label")).to_have_text(CAT_LABEL)
    expect(cat_card.get_by_test_id("bar")).to_have_count(5)
    expect(cat_card.get_by_test_id("bar").first).to_contain_text("%")

    # A bad value is refused by the server and explained next to its field.
    page.get_by_label("Top k").fill("99")
    page.get_by_test_id("options-save").click()
    expect(page.get_by_test_id("error-top_k")).to_contain_text("top_k must be between 1 and 20")
    expect(page.get_by_label("Top k")).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Top k").fill("2")
    page.get_by_test_id("options-save").click()
    expect(page.get_by_test_id("options-status")).to_have_text("Saved.")
    expect(page.get_by_test_id("error-top_k")).to_be_hidden()

    # The coffee, under top_k = 2: exactly two bars.
    page.get_by_test_id("file-input").set_input_files(str(DATA / "coffee.jpg"))
    coffee_card = page.locator("[data-testid=result-card][data-filename='coffee.jpg']")
    expect(coffee_card).to_have_attribute("data-state", "done")
    expect(coffee_card.get_by_test_id("bar")).to_have_count(2)
    expect(coffee_card.get_by_test_id("result-top-label")).to_have_text(COFFEE_LABEL)
    expect(page.get_by_test_id("history-item")).to_have_count(2)

    # A reload keeps the session (token in sessionStorage), the options and the history with thumbnails.
    page.reload()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    expect(page.get_by_label("Top k")).to_have_value("2")
    items = page.get_by_test_id("history-item")
    expect(items).to_have_count(2)
    expect(items.nth(0).get_by_test_id("history-label")).to_have_text(COFFEE_LABEL)
    expect(items.nth(1).get_by_test_id("history-label")).to_have_text(CAT_LABEL)
    expect(page.locator("[data-testid=history-thumb] img")).to_have_count(2)
    expect(page.get_by_test_id("history-count")).to_have_text("2 predictions")
    expect(page.get_by_test_id("history-more")).to_be_hidden()

    # The screenshot shows the page with results: classify both images again after the reload.
    page.get_by_test_id("file-input").set_input_files([str(DATA / "cat.jpg"), str(DATA / "coffee.jpg")])
    expect(page.locator("[data-testid=result-card][data-state=done]")).to_have_count(2)
    expect(page.get_by_test_id("history-item")).to_have_count(4)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
    # The one refused request above (422) is expected; anything else (a CSP violation, an uncaught
    # exception, a missing file) is a bug.
    problems = [text for text in page.problems if "status of 422" not in text]
    assert problems == [], problems
