"""End to end: `python app.py` on a tiny model, driven by headless Chromium and by 8 concurrent API clients.

The browser is Debian's chromium driven by Playwright's Python client (`bash tests/setup_browser.sh`
installs both; Playwright's own browser download cannot work offline). Outside CI a missing browser
skips the browser test; in CI (env CI set) the set-up script is run so the test always runs.

How the tests see what the model saw: the app runs with `--log_level debug`, which logs every prompt
(the trimmed message list, with the Gradio session) as JSON before generating.

    FLUXCHAT_SCREENSHOT=docs/screenshot.png pytest tests/test_browser.py -k browser   # also saves the README picture
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from bench.common import APP_PROMPT_MARKER, log_lines, logged_prompts, running_app
from tests.conftest import PYTHON, REPO

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Both turns and both replies must fit the tiny model's 64-token context, or the first turn is trimmed.
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """The real app as a user starts it; yields (url, path of its log)."""
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(tiny_run, log_path, "--max_new_tokens", MAX_NEW_TOKENS, "--concurrency", 4) as (url, _):
        yield url, log_path


def most_replies_at_once(log_path: Path, since: int) -> int:
    """From the order of 'prompt' (start) and 'reply' (end) lines: how many generations overlapped."""
    running: set[str] = set()
    most = 0
    for line in log_lines(log_path, since):
        if APP_PROMPT_MARKER in line:
            running.add(json.loads(line.split(APP_PROMPT_MARKER, 1)[1])["session"][:8])
            most = max(most, len(running))
        elif match := re.search(r" fluxchat\.app: reply session (\S+) ", line):
            running.discard(match.group(1))
    return most


def words(text: str) -> str:
    """Text as the chat shows it: markdown rendering changes whitespace and punctuation, not letters."""
    return re.sub(r"[\W_]", "", text)


def browser_or_skip():
    ready = shutil.which("chromium") and importlib.util.find_spec("playwright")
    if not ready and os.environ.get("CI"):
        subprocess.run(["bash", REPO / "tests" / "setup_browser.sh"], check=True, env={**os.environ, "PYTHON": PYTHON})
        importlib.invalidate_caches()
    elif not ready:
        pytest.skip("needs Debian's chromium and playwright: run `bash tests/setup_browser.sh` (CI runs it itself)")
    return shutil.which("chromium")


WATCH_LAST_BOT_MESSAGE = """() => {
    window.botTexts = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.botTexts.push([bots.length, bots[bots.length - 1].innerText]);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_browser_two_turns_streamed_and_second_uses_first(server):
    chromium = browser_or_skip()
    from playwright.sync_api import sync_playwright

    url, log_path = server
    earlier = log_path.stat().st_size
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 960})
            page.goto(url)
            textbox = page.get_by_test_id("textbox")
            page.evaluate(WATCH_LAST_BOT_MESSAGE)
            replies = []
            for turn, text in enumerate(["Good morrow, who art thou?", "And whither goest thou?"], start=1):
                textbox.fill(text)
                textbox.press("Enter")
                page.get_by_test_id("bot").nth(turn - 1).wait_for(timeout=30_000)
                page.wait_for_function(  # a reply is finished when the textbox is editable again
                    "() => !document.querySelector('[data-testid=\"textbox\"]').disabled", timeout=60_000
                )
                replies.append(page.get_by_test_id("bot").nth(turn - 1).inner_text())
            if os.environ.get("FLUXCHAT_SCREENSHOT"):
                page.screenshot(path=os.environ["FLUXCHAT_SCREENSHOT"])
            seen = page.evaluate("window.botTexts")
        finally:
            browser.close()

    assert all(words(reply) for reply in replies), replies
    first_reply_views = {text for count, text in seen if count == 1 and words(text)}
    assert len(first_reply_views) >= 2, f"the first reply should appear piece by piece, saw only {first_reply_views}"
    assert words(replies[0]) in {words(text) for text in first_reply_views}

    prompts = logged_prompts(log_path, since=earlier)
    second = [p for p in prompts if p["messages"][-1]["content"] == "And whither goest thou?"]
    assert len(second) == 1, prompts
    history = second[0]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"], "nothing trimmed: both turns fit"
    assert history[0]["content"] == "Good morrow, who art thou?"
    assert words(history[1]["content"]) == words(replies[0]), "the model saw the reply the browser showed"


def test_eight_concurrent_clients_keep_their_own_conversations(server):
    from gradio_client import Client

    url, log_path = server
    earlier = log_path.stat().st_size
    names = ["apple", "brook", "cedar", "daisy", "ember", "fable", "grove", "heron"]
    results: dict[str, list[str]] = {}
    errors: list[str] = []
    start = threading.Barrier(len(names))

    def converse(name: str):
        try:
            client = Client(url, verbose=False)
            start.wait(timeout=120)  # every client sends its first turn at the same moment
            first = client.predict(f"{name} one", MAX_NEW_TOKENS, 0.8, 50, 0.95, api_name="/chat")
            second = client.predict(f"{name} two", MAX_NEW_TOKENS, 0.8, 50, 0.95, api_name="/chat")
            results[name] = [first, second]
        except Exception as err:  # noqa: BLE001 - reported below with the client's name
            errors.append(f"{name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=converse, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert sorted(results) == sorted(names)

    prompts = logged_prompts(log_path, since=earlier)
    for name in names:
        second = [p for p in prompts if p["messages"][-1]["content"] == f"{name} two"]
        assert len(second) == 1, (name, second)
        assert second[0]["messages"] == [
            {"role": "user", "content": f"{name} one"},
            {"role": "assistant", "content": results[name][0]},
            {"role": "user", "content": f"{name} two"},
        ], f"{name}'s second turn must carry exactly its own first turn"
    sessions = {p["session"] for p in prompts if p["messages"][0]["content"].split()[0] in names}
    assert len(sessions) == len(names), "one Gradio session per client"
    assert most_replies_at_once(log_path, since=earlier) >= 2, "users are served at the same time, not one by one"


def post_upload(url: str, name: str, data: bytes) -> tuple[int, str]:
    """POST a file to Gradio's upload route as any anonymous client can: (status, body)."""
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": (name, data)}, timeout=60)
    return response.status_code, response.text


def test_uploads_are_refused_the_app_takes_no_files(server):
    """Issue 12 item 9: 5 MB and an HTML page were stored and served back; now any upload with content is refused."""
    url, _ = server
    status, body = post_upload(url, "big.bin", b"\0" * (5 << 20))
    assert (status, body) == (413, "Request too large for this app.\n")  # past any request's bound: never read
    status, body = post_upload(url, "page.html", b"<html><script>alert(1)</script></html>")
    assert status == 413 and "maximum allowed size" in body  # small: Gradio's own 0-byte upload limit
