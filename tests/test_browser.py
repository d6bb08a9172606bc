"""The web page in a real headless Chromium (Python Playwright): log in, classify, change options,
reload, see the history; correct a prediction at a desktop's and at a phone's width. Where Chromium
or Playwright is missing: skipped, saying what to install, or failed under CI=true.

Leaves full-page screenshots in tests/artifacts/ (browser.png, correct-this-<width>.png,
api-docs.png).
"""

from __future__ import annotations

import base64
import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from handlers.web import CONTENT_SECURITY_POLICY
from tests.conftest import DATA, TEST_SECRET, RunningServer, make_config, tool_missing

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

pytestmark = pytest.mark.timeout(90)


def require_browser() -> str:
    """The Chromium to drive; where it or Playwright is missing, the test skips saying what to
    install, or fails under CI=true (tests.conftest.tool_missing)."""
    if sync_playwright is None:
        tool_missing("browser test needs the Python package playwright: .venv/bin/pip install playwright "
                     "(never `playwright install`; the test uses the system Chromium)")
    executable = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if executable is None:
        tool_missing("browser test needs Chromium at /usr/bin/chromium: apt-get install -y chromium")
    return executable


@pytest.fixture(scope="session")
def chromium() -> str:
    # Session-scoped, so that it is decided before the module's server starts.
    return require_browser()


DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}  # an iPhone 12-15's CSS viewport


@pytest.fixture
def viewport() -> dict[str, int]:
    return DESKTOP


@pytest.fixture
def touch() -> bool:
    """Whether the browser is a phone's: a touch screen, no hover, a coarse pointer."""
    return False


@pytest.fixture
def page(chromium: str, server: RunningServer, viewport: dict[str, int], touch: bool):
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            tool_missing(f"Chromium at {chromium} does not start headless: {exc}")
        try:
            context = browser.new_context(viewport=viewport, has_touch=touch, is_mobile=touch)
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


def assert_in_view(locator, width: int) -> None:
    """Every element of `locator` is drawn (non-zero box) and lies inside the viewport's width."""
    assert locator.count() > 0
    for index in range(locator.count()):
        box = locator.nth(index).bounding_box()
        assert box is not None and box["width"] > 0 and box["height"] > 0, box
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (box, width)


def api_item(server: RunningServer, page, history_id: str) -> dict:
    """The history item as the API has it, read with the page's own session token."""
    token = page.evaluate("sessionStorage.getItem('inference.token')")
    answer = httpx.get(f"{server.url}/v1/history/{history_id}", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_correct_this(page, server: RunningServer, viewport: dict[str, int]) -> None:
    width = viewport["width"]
    page.goto(f"{server.url}/")
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    card = page.locator("[data-testid=result-card][data-filename='cat.jpg']")
    expect(card).to_have_attribute("data-state", "done")

    # The score bars and their percentages are drawn, inside the screen, at either width.
    bars = card.get_by_test_id("bar")
    expect(bars).to_have_count(5)
    assert_in_view(card.locator(".bar-track"), width)
    assert_in_view(card.locator(".bar-fill"), width)
    assert_in_view(card.locator(".bar-value"), width)
    for index in range(5):
        expect(bars.nth(index).locator(".bar-value")).to_have_text(re.compile(r"^\d+\.\d%$"))
    history_id = card.get_attribute("data-history-id")
    assert history_id
    history_row = page.locator(f"[data-testid=history-item][data-history-id='{history_id}']")
    expect(history_row.get_by_test_id("feedback-given")).to_be_hidden()

    # "Correct this" offers the card's own top-k first, in its order; typed text ranks the exact name,
    # then names starting with it, the card's own labels first among equals.
    own_labels = [text.strip() for text in bars.locator(".bar-label").all_text_contents()]
    card.get_by_test_id("feedback-open").click()
    offered = card.get_by_role("option")
    expect(offered).to_have_count(5)
    assert [(text.rsplit("#", 1)[0]).strip() for text in offered.all_text_contents()] == own_labels
    search = card.get_by_role("combobox", name="Right label")
    for typed, first in [("tiger c", "tiger cat"), ("tiger", "tiger"), (own_labels[2][:2], None)]:
        # Two letters of the third label: the first of the card's labels starting with them comes first.
        first = first or next(label for label in own_labels if label.lower().startswith(typed.lower()))
        search.fill(typed)
        expect(offered.first).to_have_text(re.compile(f"^{re.escape(first)}#"))
    search.press("Escape")  # closes the list
    search.press("Escape")  # closes the form
    expect(card.get_by_test_id("feedback-form")).to_be_hidden()

    # Correct it to the second label, found by searching for its first letters; picked with the
    # mouse on a desktop, with the keyboard on a phone.
    second = bars.nth(1).locator(".bar-label")
    label = second.text_content() or ""
    class_index = int((second.get_attribute("title") or "").rsplit(" ", 1)[-1])
    card.get_by_test_id("feedback-open").click()
    search = card.get_by_role("combobox", name="Right label")
    expect(search).to_be_focused()
    search.fill(label[:4])
    option = card.get_by_role("option", name=re.compile(f"^{re.escape(label)}"))
    expect(option).to_be_visible()
    if width == DESKTOP["width"]:
        option.click()
    else:
        assert_in_view(card.get_by_test_id("feedback-options"), width)
        while option.get_attribute("aria-selected") != "true":
            search.press("ArrowDown")
        search.press("Enter")
    for control in (card, history_row):  # the card and its history row both show it
        expect(control.get_by_test_id("feedback-given-label")).to_have_text(label)
    expect(card.get_by_test_id("feedback-form")).to_be_hidden()
    feedback = api_item(server, page, history_id)["feedback"]
    assert (feedback["class_index"], feedback["label"]) == (class_index, label)

    # A name typed in full, in any case, is resolved by the server; an unknown one is explained.
    history_row.get_by_test_id("feedback-open").click()
    row_search = history_row.get_by_role("combobox", name="Right label")
    row_search.fill("no such label at all")
    row_search.press("Enter")
    expect(history_row.get_by_test_id("feedback-error")).to_be_visible()
    expect(row_search).to_have_attribute("aria-invalid", "true")
    row_search.fill("goldf")  # a label no answer on this page named: the served model's whole list is searched
    expect(history_row.get_by_role("option", name=re.compile("^goldfish"))).to_be_visible()
    row_search.fill("GOLDFISH")
    row_search.press("Enter")
    expect(history_row.get_by_test_id("feedback-given-label")).to_have_text("goldfish")
    expect(card.get_by_test_id("feedback-given-label")).to_have_text("goldfish")
    assert api_item(server, page, history_id)["feedback"]["class_index"] == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"correct-this-{width}.png"), full_page=True)

    # After a reload the history shows the stored correction, and it can be removed there.
    page.reload()
    history_row = page.locator(f"[data-testid=history-item][data-history-id='{history_id}']")
    expect(history_row.get_by_test_id("feedback-given-label")).to_have_text("goldfish")
    assert_in_view(history_row.get_by_test_id("feedback-remove"), width)
    history_row.get_by_test_id("feedback-remove").click()
    expect(history_row.get_by_test_id("feedback-given")).to_be_hidden()
    expect(history_row.get_by_test_id("feedback-open")).to_be_focused()
    assert api_item(server, page, history_id)["feedback"] is None

    # Log out and erase, confirmed: the history is gone from the server, and the page is logged out.
    token = page.evaluate("sessionStorage.getItem('inference.token')")
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_request(lambda request: request.method == "DELETE" and "erase=true" in request.url):
        page.get_by_test_id("erase").click()  # the server's erase itself: tests/test_feedback.py
    expect(page.get_by_test_id("login")).to_be_visible()
    assert_in_view(page.get_by_test_id("login"), width)
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/v1/session", headers={"Authorization": f"Bearer {token}"}).status_code == 401

    problems = [text for text in page.problems if "status of 422" not in text]  # the unknown label
    assert problems == [], problems


def assert_no_horizontal_scroll(page) -> None:
    widths = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], widths


@pytest.mark.parametrize(("viewport", "touch"), [(PHONE, True)], ids=["phone"])
def test_on_a_phone(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    assert_no_horizontal_scroll(page)
    page.get_by_test_id("login").tap()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    assert_no_horizontal_scroll(page)  # the header fits with the session's status and buttons

    # "Tap to choose or take a photo": the phone's picker, which offers the camera for image types.
    expect(page.get_by_test_id("dropzone-touch")).to_have_text("Tap to choose or take a photo")
    expect(page.get_by_test_id("dropzone-touch")).to_be_visible()
    expect(page.get_by_test_id("dropzone-pointer")).to_be_hidden()
    accept = page.get_by_test_id("file-input").get_attribute("accept") or ""
    assert "image/jpeg" in accept.split(",")
    for name in ("top_k", "resize", "crop"):
        expect(page.get_by_test_id(f"option-{name}")).to_have_attribute("inputmode", "numeric")

    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    card = page.locator("[data-testid=result-card][data-filename='cat.jpg']")
    expect(card).to_have_attribute("data-state", "done")
    assert_no_horizontal_scroll(page)

    # Correct this: the top-k is offered without popping the keyboard, and no arrow-key hints.
    card.get_by_test_id("feedback-open").tap()
    expect(card.get_by_role("option")).to_have_count(5)
    expect(card.get_by_test_id("feedback-hint")).to_be_hidden()
    expect(card.get_by_role("combobox", name="Right label")).not_to_be_focused()
    second = card.get_by_role("option").nth(1)
    label = (second.text_content() or "").rsplit("#", 1)[0]
    second.tap()
    expect(card.get_by_test_id("feedback-given-label")).to_have_text(label)
    assert_no_horizontal_scroll(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone.png"), full_page=True)
    assert page.problems == [], page.problems


def test_paste_an_image(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    # A paste event carrying an image file, as a browser sends for a copied image or screenshot.
    page.evaluate("""async (encoded) => {
        const bytes = Uint8Array.from(atob(encoded), (char) => char.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "pasted.jpg", { type: "image/jpeg" }));
        document.body.dispatchEvent(new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true }));
    }""", base64.b64encode((DATA / "cat.jpg").read_bytes()).decode())
    card = page.locator("[data-testid=result-card][data-filename='pasted.jpg']")
    expect(card).to_have_attribute("data-state", "done")
    expect(card.get_by_test_id("result-top-label")).to_have_text(CAT_LABEL)
    expect(page.get_by_test_id("history-item")).to_have_count(1)
    assert page.problems == [], page.problems


RAW_CODE = re.compile(r"[a-z]+_[a-z_]+|\b[45]\d\d\b")  # a snake_case error code or an HTTP status


def assert_for_people(locator) -> None:
    """The text shown is a sentence for a person: no raw error code or status in it."""
    text = locator.text_content() or ""
    assert text and not RAW_CODE.search(text), text


def test_api_key_login(page, serve) -> None:
    from service.auth import api_key_hash

    config = make_config(auth={"secret_keys": [TEST_SECRET], "api_keys": [api_key_hash("s3cret-key")]})
    with serve(config) as keyed:
        page.goto(f"{keyed.url}/")
        expect(page.locator("body[data-ready=true]")).to_have_count(1)
        expect(page.get_by_label("API key")).to_be_hidden()

        # The server answers the first login with missing_api_key: the field shows, explained.
        page.get_by_test_id("login").click()
        key = page.get_by_label("API key")
        expect(key).to_be_visible()
        expect(key).to_be_focused()
        expect(page.get_by_test_id("alert")).to_contain_text("asks for an API key")
        assert_for_people(page.get_by_test_id("alert"))

        key.fill("wrong-key")
        key.press("Enter")
        expect(page.get_by_test_id("alert")).to_contain_text("not valid")
        assert_for_people(page.get_by_test_id("alert"))
        expect(key).to_have_attribute("aria-invalid", "true")

        key.fill("s3cret-key")
        page.get_by_test_id("login").click()
        expect(page.get_by_test_id("session-status")).to_contain_text("Session")
        expect(key).to_be_hidden()
        expect(page.get_by_test_id("alert")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('inference.apiKey')") == "s3cret-key"
        page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
        expect(page.locator("[data-testid=result-card][data-state=done]")).to_have_count(1)

        # Kept for the tab: after logging out, Log in uses the key without asking again.
        page.get_by_test_id("logout").click()
        expect(page.get_by_test_id("login")).to_be_visible()
        with page.expect_response(lambda response: response.url.endswith("/v1/sessions")) as answer:
            page.get_by_test_id("login").click()
        assert answer.value.status == 201
        assert answer.value.request.headers["authorization"] == "ApiKey s3cret-key"
        expect(page.get_by_test_id("session-status")).to_contain_text("Session")
        expect(key).to_be_hidden()
        problems = [text for text in page.problems if "status of 401" not in text]  # the two refusals
        assert problems == [], problems


def test_errors_are_written_for_people(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")

    # Not an image: the card says so in words.
    page.get_by_test_id("file-input").set_input_files(
        {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"these are not the pixels you want"})
    card = page.locator("[data-testid=result-card][data-filename='notes.jpg']")
    expect(card).to_have_attribute("data-state", "error")
    expect(card.get_by_test_id("result-error")).to_contain_text("not an image")
    assert_for_people(card.get_by_test_id("result-error"))

    # The server unreachable (the connection fails): said as such, without the browser's words.
    page.route("**/v1/predict*", lambda route: route.abort("connectionrefused"))
    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    card = page.locator("[data-testid=result-card][data-filename='cat.jpg']")
    expect(card).to_have_attribute("data-state", "error")
    expect(card.get_by_test_id("result-error")).to_contain_text("server cannot be reached")
    assert "fetch" not in (card.get_by_test_id("result-error").text_content() or "").lower()
    page.unroute("**/v1/predict*")

    # The session ended elsewhere: the page says so, asks to log in again, and is logged out.
    token = page.evaluate("sessionStorage.getItem('inference.token')")
    with server.client() as http:
        assert http.delete("/v1/session", headers={"Authorization": f"Bearer {token}"}).status_code == 204
    page.get_by_test_id("file-input").set_input_files(str(DATA / "coffee.jpg"))
    expect(page.get_by_test_id("alert")).to_contain_text("Log in again")
    assert_for_people(page.get_by_test_id("alert"))
    expect(page.get_by_test_id("login")).to_be_visible()


@pytest.mark.parametrize("missing", ["Chromium", "playwright"])
def test_a_missing_browser_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   missing: str) -> None:
    this_module = sys.modules[__name__]
    if missing == "Chromium":
        monkeypatch.setattr(this_module, "CHROMIUM", tmp_path / "chromium")
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        monkeypatch.setattr(this_module, "sync_playwright", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"needs .*{missing}.*CI=true"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=f"needs .*{missing}"):
        require_browser()


def test_api_docs_page_is_html_with_the_page_csp(server: RunningServer) -> None:
    with server.client() as http:
        docs = http.get("/docs")
        assert docs.status_code == 200 and "text/html" in docs.headers["Content-Type"]
        assert docs.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "/static/swagger-ui/swagger-ui-bundle.js" in docs.text and "<script>" not in docs.text
        bundle = http.get("/static/swagger-ui/swagger-ui-bundle.js")
        assert bundle.status_code == 200 and "javascript" in bundle.headers["Content-Type"]
        assert bundle.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_api_docs_render_the_operations_from_the_server_alone(page, server: RunningServer) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.url}/docs")
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    predict = page.locator(".opblock-post", has=page.locator("[data-path='/v1/predict']"))
    expect(predict).to_have_count(1)
    expect(predict.locator(".opblock-summary-method")).to_have_text("POST")
    expect(page.locator(".opblock-get [data-path='/v1/history']")).to_have_count(1)
    expect(page.locator(".information-container .title")).to_contain_text("Session-aware inference server")
    # Opening an operation shows its parameters and responses (Swagger UI at work, not a static list).
    predict.locator(".opblock-summary").first.click()
    expect(predict.locator(".responses-wrapper")).to_be_visible()
    origin = server.url.rstrip("/")
    strays = [url for url in requested if not url.startswith(f"{origin}/") and not url.startswith("data:")]
    assert strays == [], strays
    assert f"{origin}/openapi.json" in requested
    assert page.problems == [], page.problems  # a CSP violation is a console error
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "api-docs.png"))


def bar_texts(locator) -> list[tuple[str, str]]:
    """(label, percentage) of each score bar in `locator`."""
    rows = locator.get_by_test_id("bar")
    return [((rows.nth(i).locator(".bar-label").text_content() or "").strip(),
             rows.nth(i).locator(".bar-value").text_content() or "") for i in range(rows.count())]


def test_the_last_results_survive_a_reload(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    for name in ["cat.jpg", "coffee.jpg"]:
        page.get_by_test_id("file-input").set_input_files(str(DATA / name))
        expect(page.locator(f"[data-testid=result-card][data-filename='{name}']")).to_have_attribute(
            "data-state", "done")
    cards = page.get_by_test_id("result-card")
    before = [(cards.nth(i).get_attribute("data-filename"), bar_texts(cards.nth(i))) for i in range(2)]
    cat = page.locator("[data-testid=result-card][data-filename='cat.jpg']")
    # A correction made on the card is kept with it.
    second_label = before[1][1][1][0]
    cat.get_by_test_id("feedback-open").click()
    cat.get_by_role("option").nth(1).click()
    expect(cat.get_by_test_id("feedback-given-label")).to_have_text(second_label)

    page.reload()
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    expect(cards).to_have_count(2)
    expect(page.locator("[data-testid=result-card][data-restored=true]")).to_have_count(2)
    assert [(cards.nth(i).get_attribute("data-filename"), bar_texts(cards.nth(i))) for i in range(2)] == before
    expect(cat.get_by_test_id("result-top-label")).to_have_text(CAT_LABEL)
    expect(cat.get_by_test_id("feedback-given-label")).to_have_text(second_label)
    # The image is the history thumbnail kept in the tab, not the upload.
    assert (cat.get_by_test_id("result-image").get_attribute("src") or "").startswith("data:image/jpeg")
    expect(page.get_by_test_id("results").locator(".empty")).to_be_hidden()

    # Logging out forgets them: a new session starts with no cards, even after a reload.
    page.get_by_test_id("logout").click()
    expect(cards).to_have_count(0)
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    page.reload()
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    expect(cards).to_have_count(0)
    assert page.problems == [], page.problems


def test_a_history_item_opens_to_its_bars(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")
    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    card = page.locator("[data-testid=result-card][data-filename='cat.jpg']")
    expect(card).to_have_attribute("data-state", "done")
    card_bars = bar_texts(card)
    history_id = card.get_attribute("data-history-id")

    # After a reload the row comes from GET /v1/history; opening it shows the card's bars.
    page.evaluate("() => { for (const key of Object.keys(sessionStorage)) "
                  "if (key.startsWith('inference.results.')) sessionStorage.removeItem(key); }")
    page.reload()
    row = page.locator(f"[data-testid=history-item][data-history-id='{history_id}']")
    opener = row.get_by_test_id("history-open")
    expect(opener).to_have_attribute("aria-expanded", "false")
    expect(row.get_by_test_id("history-bars")).to_be_hidden()
    opener.click()
    expect(opener).to_have_attribute("aria-expanded", "true")
    bars = row.get_by_test_id("history-bars")
    expect(bars).to_be_visible()
    expect(bars.get_by_test_id("bar")).to_have_count(5)
    assert bar_texts(bars) == card_bars
    opener.press("Enter")  # a button: the keyboard closes it too
    expect(opener).to_have_attribute("aria-expanded", "false")
    expect(bars).to_be_hidden()
    assert page.problems == [], page.problems


def log_in(page, server: RunningServer) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("body[data-ready=true]")).to_have_count(1)
    page.get_by_test_id("login").click()
    expect(page.get_by_test_id("session-status")).to_contain_text("Session")


def test_one_model_served_shows_no_model_selector(page, server: RunningServer) -> None:
    listing = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {login_token(server)}"}).json()
    if len(listing["models"]) > 1:
        pytest.skip("the server serves several models; test_choosing_a_model covers them")
    log_in(page, server)
    expect(page.get_by_test_id("model-field")).to_have_count(1)
    expect(page.get_by_test_id("model-field")).to_be_hidden()
    expect(page.get_by_test_id("option-model").locator("option")).to_have_count(1)  # the one model, read
    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    card = page.locator("[data-testid=result-card][data-state=done]")
    expect(card.get_by_test_id("result-model")).to_be_hidden()
    expect(page.get_by_test_id("history-meta")).not_to_contain_text(listing["models"][0]["name"])
    assert page.problems == [], page.problems


def login_token(server: RunningServer) -> str:
    return httpx.post(f"{server.url}/v1/sessions").json()["token"]


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_choosing_a_model(page, models_server: RunningServer, viewport: dict[str, int]) -> None:
    """A second model served beside the default ("shapes", from the model repository)."""
    server = models_server
    listing = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {login_token(server)}"}).json()
    default = next(model for model in listing["models"] if model["name"] == listing["default"])
    others = [model for model in listing["models"] if model is not default]
    assert others, listing
    other = others[0]
    log_in(page, server)

    # The selector lists every model, on the session's (the default); choosing one shows its defaults.
    selector = page.get_by_test_id("option-model")
    expect(page.get_by_test_id("model-field")).to_be_visible()
    expect(selector.locator("option")).to_have_count(len(listing["models"]))
    expect(selector).to_have_value(default["name"])
    page.get_by_label("Top k").fill("3")
    page.get_by_test_id("options-save").click()
    expect(page.get_by_test_id("options-status")).to_have_text("Saved.")
    selector.select_option(other["name"])
    expect(page.get_by_test_id("options-status")).to_contain_text(f"Model {other['name']} chosen")
    expect(page.get_by_label("Resize")).to_have_value(str(other["preprocess"]["resize"]))
    expect(page.get_by_label("Crop")).to_have_value(str(other["preprocess"]["crop"]))
    expect(page.get_by_label("Interpolation")).to_have_value(other["preprocess"]["interpolation"])
    expect(page.get_by_label("Top k")).to_have_value("3")  # not a preprocessing option: kept
    token = page.evaluate("sessionStorage.getItem('inference.token')")
    labels = httpx.get(f"{server.url}/v1/models/{other['name']}/labels",
                       headers={"Authorization": f"Bearer {token}"}).json()["labels"]

    # A card of the chosen model names it, and its corrections offer that model's labels only.
    page.get_by_test_id("file-input").set_input_files(str(DATA / "cat.jpg"))
    card = page.locator("[data-testid=result-card][data-state=done]")
    expect(card.get_by_test_id("result-model")).to_have_text(f"Model {other['name']}")
    expect(page.get_by_test_id("history-meta").first).to_contain_text(other["name"])
    card.get_by_test_id("feedback-open").click()
    offered = card.get_by_role("option")
    expect(offered).to_have_count(min(3, len(labels)))
    card.get_by_test_id("feedback-input").fill(labels[-1][:2])
    expect(offered.first).to_contain_text(labels[-1][:2], ignore_case=True)
    names = [text.rsplit("#", 1)[0].strip() for text in offered.all_text_contents()]
    assert names and set(names) <= set(labels), names
    card.get_by_test_id("feedback-input").fill(labels[-1])
    card.get_by_test_id("feedback-input").press("Enter")
    expect(card.get_by_test_id("feedback-given-label")).to_have_text(labels[-1])
    history_id = card.get_attribute("data-history-id")
    stored = api_item(server, page, history_id or "")
    assert stored["model"]["name"] == other["name"]
    assert stored["feedback"]["class_index"] == len(labels) - 1

    # Back to the default: its preprocessing defaults again, and the page keeps working at this width.
    selector.select_option(default["name"])
    expect(page.get_by_label("Resize")).to_have_value(str(default["preprocess"]["resize"]))
    assert_in_view(page.get_by_test_id("option-model"), viewport["width"])
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"models-{viewport['width']}.png"), full_page=True)
    assert page.problems == [], page.problems
