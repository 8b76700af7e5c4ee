"""The web chat page in headless Chromium (Debian's, driven by playwright): a message streams a reply, the
conversation is kept across turns, the page shows tokens per second, and "New chat" clears it."""

import os
import shutil
from pathlib import Path

import pytest

from tests.serve.conftest import LiveServer, make_server

ROOT = Path(__file__).resolve().parents[2]
EXTRACTED = ROOT / ".venv" / "chromium"  # where `make setup` unpacks Debian's chromium packages


def _chromium() -> tuple[str, dict] | None:
    """The browser binary and the environment it needs, or None."""
    extracted = EXTRACTED / "usr" / "lib" / "chromium" / "chromium"
    if extracted.is_file():
        libraries = sorted({str(p.parent) for p in EXTRACTED.rglob("*.so*")})
        return str(extracted), {**os.environ, "LD_LIBRARY_PATH": ":".join(libraries)}
    system = Path("/usr/lib/chromium/chromium")
    if system.is_file():
        return str(system), dict(os.environ)
    found = shutil.which("chromium")
    return (found, dict(os.environ)) if found else None


def test_web_chat_streams_and_keeps_the_conversation(chat_model_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium: `make setup` unpacks Debian's packages into .venv/chromium")
    executable, env = browser_path
    live = LiveServer(make_server(chat_model_dir))
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"],
                                                 env=env)
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-chat'")
            page.fill("#max-tokens", "12")  # the tiny model's context is 256 tokens: keep both turns inside it
            for turn, text in enumerate(["hello there", "and again"], start=1):
                page.fill("#input", text)
                page.keyboard.press("Enter")
                page.wait_for_function(f"document.querySelectorAll('.stats').length === {turn} && "
                                       "document.querySelectorAll('.stats')[" + str(turn - 1) +
                                       "].textContent.includes('tokens/s')", timeout=30_000)
            users = page.locator(".user").all_inner_texts()
            assistants = page.locator(".assistant").all_inner_texts()
            assert users == ["hello there", "and again"] and len(assistants) == 2
            assert not any(a.startswith("Error") for a in assistants)
            assert "tokens/s" in page.inner_text("#speed")
            assert page.evaluate("messages.length") == 4  # both turns are sent with the next request
            page.screenshot(path=str(tmp_path / "web-chat.png"))
            page.click("#reset")
            assert page.locator(".msg").count() == 0 and page.evaluate("messages.length") == 0
            browser.close()
    finally:
        live.stop()
