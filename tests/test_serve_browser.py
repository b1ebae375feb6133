"""The chat page in a real browser: headless Chromium (Debian's `chromium` package, or $JAXCHAT_CHROMIUM) driven by
Playwright, which never downloads a browser of its own here. A scripted model replies "é🙂世", a calculator call
7*6 (the server forces its result 42), then " la la la ..." until the token limit: a stream long enough to watch.

One walk through the page: send with Enter, watch tokens stream in, see the tool call and its result rendered apart from
the text, Shift+Enter for a newline, settings through slash commands and the visible controls, click a user message to
edit it, regenerate a reply, start a new conversation, and the error states (server unreachable, a 400 from the API).
The screenshot goes to $JAXCHAT_SCREENSHOT_DIR (default out/ in the repository) as serve_chat.png."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-dev.txt (playwright)")
CHROMIUM = os.environ.get("JAXCHAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    not CHROMIUM, reason="no system Chromium: `apt-get install chromium` (.ci/run does it when root), or set "
                         "$JAXCHAT_CHROMIUM to a Chromium binary")
SCREENSHOT_DIR = Path(os.environ.get("JAXCHAT_SCREENSHOT_DIR") or Path(__file__).resolve().parent.parent / "out")

# Records the streaming reply's length at every DOM change, to prove text arrived in pieces.
RECORDER = """
window.__lengths = [];
new MutationObserver(() => {
  const body = document.querySelector('.msg.assistant.streaming .body');
  if (body) window.__lengths.push(body.textContent.length);
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server():
    from test_serve import start_server

    srv = start_server("looping")
    yield srv
    srv.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


def wait_idle(page):
    page.wait_for_function("document.body.dataset.busy === ''", timeout=60_000)


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_idle(page)


def test_chat_page_end_to_end(server, browser):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 960, "height": 820})
    bodies, page_errors = [], []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.add_init_script(RECORDER)
    page.goto(server.url)
    expect(page.locator("body")).to_have_attribute("data-health", "ok")
    expect(page.locator("#banner")).to_be_hidden()

    # send with Enter; the reply streams in (the tiny model's context is 128 tokens: keep replies short)
    send(page, "/maxtokens 40")
    send(page, "hello there")
    assert bodies[-1] == {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0.8, "top_k": 50,
                          "max_tokens": 40, "stream": True}
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, f"the reply did not appear token by token: {lengths}"
    expect(page.locator(".msg.user")).to_have_text(["hello there"])
    expect(page.locator(".msg.console")).to_have_text(["maxtokens set to 40"])
    reply = page.locator(".msg.assistant .body")
    expect(reply).to_have_count(1)
    text = reply.inner_text()
    assert text.startswith("é🙂世") and "la la la" in text and "\ufffd" not in text
    # the calculator call and its result are their own elements, not plain text
    expect(page.locator(".msg.assistant .tool-call")).to_have_text("7*6")
    expect(page.locator(".msg.assistant .tool-output")).to_have_text("42")
    assert "<|python_start|>" not in text
    expect(page.locator(".msg.assistant .length")).to_be_visible()  # it ran to the token limit and says so

    # Shift+Enter is a newline, not a send
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two" and len(bodies) == 1
    page.fill("#input", "")

    # settings: slash commands and the visible controls
    send(page, "/temperature 0.3")
    expect(page.locator(".msg.console").last).to_have_text("temperature set to 0.3")
    assert page.input_value("#temperature") == "0.3"
    send(page, "/topk 500")
    expect(page.locator(".msg.console").last).to_contain_text("from 0 to 200")
    page.fill("#topk", "9")
    page.dispatch_event("#topk", "change")
    send(page, "/help")
    expect(page.locator(".msg.console").last).to_contain_text("/temperature")
    assert len(bodies) == 1  # commands never reach the model

    # a second turn carries the whole conversation, tool markers included, with the new settings
    send(page, "second question")
    sent = bodies[-1]
    assert (sent["temperature"], sent["top_k"]) == (0.3, 9)
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert "<|python_start|>7*6<|python_end|><|output_start|>42<|output_end|>" in sent["messages"][1]["content"]
    expect(page.locator(".msg.assistant")).to_have_count(2)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "serve_chat.png"), full_page=True)

    # click the first user message: the conversation is cut there and its text comes back to edit
    page.locator(".msg.user").first.click()
    assert page.input_value("#input") == "hello there"
    expect(page.locator(".msg.user")).to_have_count(0)
    send(page, "edited question")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "edited question"}]
    expect(page.locator(".msg.user")).to_have_text(["edited question"])
    expect(page.locator(".msg.assistant")).to_have_count(1)

    # regenerate the reply: same history, a fresh request, still one reply
    n = len(bodies)
    page.locator(".msg.assistant .regen").click()
    wait_idle(page)
    assert len(bodies) == n + 1 and bodies[-1]["messages"] == [{"role": "user", "content": "edited question"}]
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator(".msg.assistant .tool-output")).to_have_text("42")

    # a request the API refuses shows its message
    send(page, "zq xj " * 200)
    expect(page.locator(".msg.error").last).to_contain_text("context")

    # new conversation
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator(".empty")).to_be_visible()

    # the server unreachable: sending says so, and the banner says so after a reload
    page.route("**/v1/chat/completions", lambda route: route.abort())
    send(page, "anyone there?")
    expect(page.locator(".msg.error")).to_contain_text("Could not reach the server")
    expect(page.locator(".msg.assistant")).to_have_count(0)
    page.route("**/health", lambda route: route.abort())
    page.reload()
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner")).to_contain_text("Cannot reach the server")
    page.unroute("**/health")
    page.unroute("**/v1/chat/completions")
    expect(page.locator("#banner")).to_be_hidden(timeout=10_000)  # it keeps checking and recovers
    assert page_errors == []
    page.close()
