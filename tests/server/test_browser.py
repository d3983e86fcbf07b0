"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright): with an API
key, it sends a message and shows the reply as it streams in. A screenshot is kept in
tests/server/artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from playwright import sync_api

from tests.server.conftest import API_KEY, MODEL_ID, live_server
from torchchat.server.config import ServerOptions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (see README)")
    opts = ServerOptions(model_id=MODEL_ID, api_key=API_KEY)
    with live_server(opts) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 700})
            tab.srv = srv
            # Every request the page makes must go to this server: nothing from a CDN.
            tab.requests = []
            tab.on("request", lambda r: tab.requests.append(r.url))
            tab.goto(srv.url + "/")
            yield tab
        finally:
            browser.close()


def test_page_needs_the_key_then_chats_with_streaming(page):
    srv = page.srv
    page.wait_for_function("document.getElementById('model').textContent === 'enter the API key'")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function(f"document.getElementById('model').textContent === '{MODEL_ID}'")

    page.fill("#system", "You tell short stories.")
    page.eval_on_selector(
        "#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    page.fill("#max-tokens", "60")
    # Count how many times the reply bubble changes: a streamed reply arrives in pieces.
    page.evaluate(
        """() => {
        window.updates = 0;
        new MutationObserver(() => { window.updates += 1; })
          .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }"""
    )
    page.fill("#input", "Tell me a story about a cat.")
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')")

    reply = page.inner_text(".msg.assistant")
    assert page.inner_text(".msg.user") == "Tell me a story about a cat."
    assert page.evaluate("window.updates") > 5
    stats = page.inner_text("#stats")
    assert "tokens in" in stats and "tokens/s" in stats
    assert page.inner_text("#error") == ""

    # The page showed exactly what the API answers for the same conversation.
    body = {
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me a story about a cat."},
        ],
        "temperature": 0,
        "max_tokens": 60,
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    expected = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=auth).json()
    assert reply.strip() == expected["choices"][0]["message"]["content"].strip()

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)
    assert (ARTIFACTS / "chat_page.png").stat().st_size > 1000

    assert all(url.startswith(srv.url) for url in page.requests), page.requests


def test_second_turn_and_reset(page):
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
    page.wait_for_function("document.getElementById('send').hidden === false")
    assert "cached" in page.inner_text("#stats")
    page.click("#reset")
    assert page.query_selector_all(".msg") == []
