"""The chat page at / in headless Chromium against a real server process.

Debian's `chromium` (or the browser NANOSERVE_CHROMIUM names) driven by playwright's Python
package through `executable_path`: no browser download. Without a Chromium the tests skip and
say so. Screenshots at desktop and phone sizes are written to build/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import API_KEY, REPO_ROOT, ServerProcess

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = os.environ.get("NANOSERVE_CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (apt install chromium, or set NANOSERVE_CHROMIUM): "
    "the browser tests of the chat page are skipped",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO_ROOT / "build" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 120_000  # generous: CI machines have two cores


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """One browser tab on the chat page, recording console errors and chat requests."""

    def __init__(self, browser: sync_api.Browser, server: ServerProcess, settings: dict) -> None:
        self.context = browser.new_context(viewport=DESKTOP)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.chat_bodies: list[dict] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("dialog", lambda d: (self.errors.append("dialog: " + d.message), d.dismiss()))
        self.page.on("request", self._on_request)
        script = f"localStorage.setItem('nanoserve.settings', {json.dumps(json.dumps(settings))})"
        self.page.add_init_script(f"if (!localStorage.getItem('nanoserve.settings')) {script}")
        self.page.goto(server.base_url + "/")

    def _on_request(self, request: sync_api.Request) -> None:
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.chat_bodies.append(request.post_data_json)

    def ask(self, text: str) -> sync_api.Locator:
        """Sends `text`; returns the answer's node once its finish reason shows."""
        count = self.page.locator(".msg.assistant").count()
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")
        answer = self.page.locator(".msg.assistant").nth(count)
        answer.locator(".finish").wait_for()
        return answer

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: sync_api.Browser, server: ServerProcess) -> Iterator[Page]:
    p = Page(browser, server, {"temperature": "0", "max_tokens": "24"})
    try:
        yield p
    finally:
        p.close()


def test_page_loads_lists_the_model_and_logs_no_errors(page: Page, server: ServerProcess) -> None:
    page.page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.page.eval_on_selector("#model", "s => s.value") == server.model
    assert page.page.title() == "nanoserve chat"
    assert page.errors == []


def test_an_answer_streams_in_and_the_history_is_sent(page: Page) -> None:
    # Count how often the answer's text changes while it streams.
    page.page.evaluate(
        """() => {
        window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(
            document.querySelector('#messages'), {subtree: true, childList: true,
            characterData: true});
    }"""
    )
    first = page.ask("Tell me about Paris.")
    first_text = first.locator(".body").inner_text()
    assert first_text.strip()
    assert page.page.evaluate("() => window.__updates") > 3  # tokens appeared as they arrived
    assert first.locator(".finish").inner_text() in ("stop", "length")
    tokens = int(first.locator(".tokens").inner_text().split()[0])  # from the usage chunk
    assert 3 < tokens <= 24
    assert "TTFT" in first.locator(".ttft").inner_text()
    assert "tok/s" in first.locator(".tps").inner_text()

    page.ask("And of Germany?")
    assert len(page.chat_bodies) == 2
    body = page.chat_bodies[1]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 24
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == "Tell me about Paris."
    assert body["messages"][1]["content"].strip() == first_text.strip()
    assert page.errors == []

    # The conversation is listed and survives a reload.
    assert page.page.locator("#conversations li").count() == 1
    page.page.reload()
    page.page.locator(".msg.assistant").nth(1).wait_for()
    assert page.page.locator(".msg.user").nth(1).inner_text().startswith("And of Germany?")
    page.page.click("#new-chat")
    assert page.page.locator(".msg").count() == 0


def test_regenerate_and_edit_resend_the_right_history(page: Page) -> None:
    page.page.click("#system-box summary")
    page.page.fill("#system", "You are terse.")
    page.ask("Name a color.")
    page.page.click(".msg.assistant .regenerate")
    page.page.locator(".msg.assistant .finish").wait_for()
    assert len(page.chat_bodies) == 2
    assert page.chat_bodies[1]["messages"] == page.chat_bodies[0]["messages"]
    assert page.chat_bodies[0]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert page.page.locator(".msg.assistant").count() == 1

    page.page.click(".msg.user .edit")
    assert page.page.input_value("#prompt") == "Name a color."
    assert page.page.locator(".msg").count() == 0
    page.ask("Name a fruit.")
    assert page.chat_bodies[2]["messages"][1] == {"role": "user", "content": "Name a fruit."}
    assert len(page.chat_bodies[2]["messages"]) == 2


def test_stop_aborts_and_the_server_frees_the_sequence(
    browser: sync_api.Browser, server: ServerProcess
) -> None:
    p = Page(browser, server, {"temperature": "0.8", "max_tokens": "1500", "seed": "1"})
    try:
        p.page.fill("#prompt", "Write a very long story about a dragon.")
        p.page.press("#prompt", "Enter")
        p.page.wait_for_function(
            "() => document.querySelector('.msg.assistant .body').textContent.length > 10"
        )
        assert server.metrics()["nanoserve_num_requests_running"] == 1
        p.page.click("#stop")
        p.page.locator(".msg.assistant .finish").wait_for()
        assert p.page.locator(".msg.assistant .finish").inner_text() == "stopped"
        _, metrics = server.wait_idle(timeout_s=5.0)
        assert metrics["nanoserve_num_requests_running"] == 0
        assert p.page.is_visible("#send") and not p.page.is_visible("#stop")
        assert p.errors == []
    finally:
        p.close()


HOSTILE = (
    "<img src=x onerror=\"window.__pwned='img'\"> and "
    "<script>window.__pwned='script'</script> and [x](javascript:window.__pwned='link')"
    " and **bold** `code`"
)


def test_a_hostile_answer_shows_as_text_and_runs_nothing(page: Page, server: ServerProcess) -> None:
    # The server's own stream for a real request, its text replaced by markup: what the page
    # would get from a model that answered with it.
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        )
    lines = r.text.split("\n")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    text_events = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    for i, event in enumerate(text_events):
        event["choices"][0]["delta"]["content"] = HOSTILE if i == 0 else ""
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, headers={"content-type": "text/event-stream"}, body=body
        ),
    )
    answer = page.ask("<b>user text</b> <img src=y onerror=\"window.__pwned='user'\">")
    assert answer.locator(".body").inner_text().startswith("<img src=x onerror=")
    assert "<script>" in answer.locator(".body").inner_text()
    assert page.page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.page.locator("#messages a").count() == 0  # a javascript: link stays text
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("code").inner_text() == "code"
    assert "<b>user text</b>" in page.page.locator(".msg.user .body").inner_text()
    page.page.wait_for_timeout(200)
    assert page.page.evaluate("() => window.__pwned") is None
    assert page.errors == []


def test_a_server_error_is_shown_with_its_message(page: Page) -> None:
    page.page.click("#settings-toggle")
    page.page.fill("#max_tokens", "100000")  # more than the context: the server says 400
    page.page.fill("#prompt", "Hi")
    page.page.press("#prompt", "Enter")
    error = page.page.locator(".msg.assistant .error-text")
    error.wait_for()
    assert "400: This model's maximum context length is 2048 tokens" in error.inner_text()


def test_api_key_flow(browser: sync_api.Browser, strict_server: ServerProcess) -> None:
    assert httpx.get(strict_server.base_url + "/").status_code == 200  # the page needs no key
    p = Page(browser, strict_server, {"temperature": "0", "max_tokens": "8"})
    try:
        p.page.locator("#key-prompt").wait_for()  # /v1/models answered 401
        p.page.fill("#key-input", API_KEY)
        p.page.click("#key-save")
        p.page.wait_for_function("() => document.querySelector('#model').options.length > 0")
        assert p.page.is_hidden("#key-prompt")
        answer = p.ask("Hello")
        assert answer.locator(".body").inner_text().strip()
        assert p.page.evaluate("() => localStorage.getItem('nanoserve.apiKey')") == API_KEY
    finally:
        p.close()


def test_screenshots_at_desktop_and_phone_sizes(
    browser: sync_api.Browser, server: ServerProcess
) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    p = Page(browser, server, {"temperature": "0", "max_tokens": "48"})
    try:
        p.ask("Write a Python function that adds two numbers, in a code block.")
        p.page.screenshot(path=str(SCREENSHOTS / "webui-desktop.png"))
        p.page.set_viewport_size(PHONE)
        p.page.wait_for_timeout(500)  # the sidebar slides out (0.2 s)
        width = p.page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], "the page scrolls sideways on a phone"
        assert p.page.is_visible("#prompt") and p.page.is_visible("#send")
        p.page.screenshot(path=str(SCREENSHOTS / "webui-phone.png"))
    finally:
        p.close()
    for name in ("webui-desktop.png", "webui-phone.png"):
        assert (SCREENSHOTS / name).stat().st_size > 5_000
    assert Path(SCREENSHOTS).is_dir()
