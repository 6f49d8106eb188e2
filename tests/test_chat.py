"""The merchandiser chat, fast: pre-parser, language, routing with FakeModel, typed tools,
not-found suggestions, escaping, and the streaming handler when the model fails.

A tiny catalogue in a real EventStore under tmp_path, HashingEmbedder for the FAISS indexes,
`FakeModel` for every model call. Network blocked (conftest).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.chat.results import (
    ChurnSegment,
    ItemSentiment,
    NeedInfo,
    NextItems,
    NotFound,
    SearchHits,
    Timeline,
    ToolResult,
    Unavailable,
    fallback_answer,
)
from agent.chat.router import (
    ChatAgent,
    ChatEvent,
    ParsedQuestion,
    Route,
    ToolCall,
    detect_language,
    model_route,
    preparse,
    route_schema,
    rule_route,
)
from agent.chat.tools import ToolContext, run_tool
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import ChatModel, ModelUnavailableError
from agent.llm.fake import FakeModel
from agent.settings import Settings
from agent.tasks.next_item import NextItemConfig
from eval.routing_eval import args_match, load_questions

DS = "shop"
EVIL = '<img src=x onerror="window.__pwned=1">'
CATALOG = {
    "85123A": "WHITE HANGING HEART T-LIGHT HOLDER",
    "22423": "REGENCY CAKESTAND 3 TIER",
    "20725": "LUNCH BAG RED RETROSPOT",
    "22386": "JUMBO BAG PINK POLKADOT",
    "84879": "ASSORTED COLOUR BIRD ORNAMENT",
    "66666X": f"{EVIL} <script>window.__pwned=1</script> [x](javascript:alert(1)) CANDLE",
    "21212": "PACK OF 72 RETROSPOT CAKE CASES",
}
EVENTS = {
    "17850": ["85123A", "22423", "66666X", "20725"],
    "17851": ["85123A", "22423", "84879"],
    "12347": ["20725", "22386", "21212", "85123A"],
    "13047": ["84879", "66666X", "22386"],
}


class FakeRuntime(Runtime):
    """The real Runtime (store, artifacts, embedder) with a fake model."""

    def __init__(self, settings: Settings, model: ChatModel | Exception):
        super().__init__(settings)
        self.fake = model

    async def model(self) -> ChatModel:
        if isinstance(self.fake, Exception):
            raise self.fake
        return self.fake


def make_runtime(tmp_path: Path, model: ChatModel | Exception) -> FakeRuntime:
    rt = FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64"), model)
    rt.store.add_items(DS, [CatalogItem(item_id=i, title=t, price=1.5) for i, t in CATALOG.items()])
    rt.store.add_events(DS, [
        BehaviorEvent(user_id=u, item_id=i, event_type="purchase", quantity=2,
                      timestamp=datetime(2011, 10, d + 1, tzinfo=UTC))
        for u, items in EVENTS.items() for d, i in enumerate(items)
    ])
    return rt


def ctx_for(rt: Runtime) -> ToolContext:
    return ToolContext(rt, ShopLensService(rt), DS, NextItemConfig(k=3, use_llm_ranking=False, explain=False))


def route_reply(tool: str, customer_id: str | None = None, item_id: str | None = None,
                query: str | None = None) -> str:
    return json.dumps({"tool": tool, "customer_id": customer_id, "item_id": item_id, "query": query})


async def collect(agen: Any) -> list[ChatEvent]:
    return [ev async for ev in agen]


# ---- pre-parser and language --------------------------------------------------------------


@pytest.mark.parametrize(("question", "customers", "items"), [
    ("What will customer 17850 buy next, and why?", ["17850"], []),
    ("客户17850接下来可能买什么？为什么？", ["17850"], []),
    ("How do people feel about item B0009RF9DW?", [], ["B0009RF9DW"]),
    ("大家对商品B0009RF9DW的评价怎么样？", [], ["B0009RF9DW"]),
    ("Which customers would be interested in item 22423?", [], ["22423"]),
    ("Tell me about 85123a", [], ["85123A"]),
    ("Compare customer 12347 and product 84879", ["12347"], ["84879"]),
    ("Orders of 17850 in 2011", ["17850"], []),
])
def test_preparse_ids(question: str, customers: list[str], items: list[str]) -> None:
    p = preparse(question)
    assert (p.customer_ids, p.item_ids) == (customers, items)


def test_preparse_uses_the_store_when_no_keyword_decides() -> None:
    p = preparse("what about 22423?", has_user=lambda u: False, has_item=lambda i: i == "22423")
    assert p.item_ids == ["22423"] and not p.customer_ids


@pytest.mark.parametrize(("question", "month"), [
    ("Which customers who bought in October are at risk?", 10),
    ("十月份下过单的客户", 10), ("11月买过东西的顾客", 11), ("十二月的客户", 12),
    ("customers from Dec 2010", 12), ("What may customer 1 buy?", None),
])
def test_preparse_month(question: str, month: int | None) -> None:
    assert preparse(question).month == month


def test_preparse_title() -> None:
    assert preparse("Who should we target for the WHITE HANGING HEART T-LIGHT HOLDER?").title == \
        "WHITE HANGING HEART T-LIGHT HOLDER"
    assert preparse("顾客对 “REGENCY CAKESTAND 3 TIER” 有哪些差评？").title == "REGENCY CAKESTAND 3 TIER"


def test_detect_language() -> None:
    assert detect_language("客户17850接下来可能买什么？") == "zh"
    assert detect_language("What will customer 17850 buy next?") == "en"
    assert detect_language("帮我找找 tea light holder") == "zh"


# ---- routing ---------------------------------------------------------------------------


async def test_model_route_is_schema_constrained_to_preparsed_ids() -> None:
    fake = FakeModel.with_replies([route_reply("next_item", customer_id="17850")])
    parsed = preparse("What will customer 17850 buy next, and why?")
    route = await model_route(fake, parsed)
    assert route.call == ToolCall(tool="next_item", args={"customer_id": "17850"})
    assert route.call.typed_args().k == 5  # type: ignore[attr-defined]
    schema = fake.calls[0].schema
    assert schema is not None
    assert schema["properties"]["customer_id"] == {"enum": ["17850", None]}
    assert schema["properties"]["item_id"] == {"type": "null"}
    assert "next_item" in schema["properties"]["tool"]["enum"]
    assert "chat_route" not in fake.calls[0].messages[0]["content"]  # rendered, not a ref


async def test_model_route_repairs_an_invalid_answer() -> None:
    fake = FakeModel.with_replies(['{"tool": "buy_next"}', route_reply("profile", customer_id="12347")])
    route = await model_route(fake, preparse("Describe customer 12347's style"))
    assert route.call.tool == "profile" and route.trace.attempts == 2
    assert "invalid" in fake.calls[1].messages[-1]["content"]


def test_preparsed_ids_and_month_win_over_the_model() -> None:
    parsed = preparse("Which customers who bought in October are at risk of churning?")
    call = rule_route(parsed)
    assert call == ToolCall(tool="churn_segment", args={"month": 10})
    assert route_schema(parsed)["properties"]["customer_id"] == {"type": "null"}


def test_tool_call_validates_typed_args() -> None:
    with pytest.raises(ValueError):
        ToolCall(tool="next_item", args={"customer_id": "1", "k": 99})
    with pytest.raises(ValueError):
        ToolCall(tool="no_such_tool", args={})  # type: ignore[arg-type]


async def test_route_falls_back_to_rules_when_the_model_is_down(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("connection refused"))
    route = await ChatAgent(ctx_for(rt), fast_routing=False).route("客户17850接下来可能买什么？")
    assert route.source == "rules" and "connection refused" in (route.note or "")
    assert route.call == ToolCall(tool="next_item", args={"customer_id": "17850"})


def test_rules_baseline_on_the_eval_set_is_what_docs_report() -> None:
    qs = load_questions()
    assert len(qs) >= 40 and {q["lang"] for q in qs} == {"en", "zh"}
    ok = sum(q["tool"] == (c := rule_route(preparse(q["question"]))).tool and args_match(q["args"], c.args)
             for q in qs)
    assert ok / len(qs) >= 0.85


def test_args_match_rules() -> None:
    assert args_match({"customer_id": "17850"}, {"customer_id": "17850", "k": 5})
    assert not args_match({"customer_id": "17850"}, {"customer_id": "17851"})
    assert args_match({"query": "vintage doily cake stand"}, {"query": "Vintage doily cake stands"})
    assert args_match({"item_query": "PARTY BUNTING"}, {"query": "party bunting"})
    assert not args_match({"month": 10}, {"month": 10, "customer_id": "17850"})


# ---- tools -------------------------------------------------------------------------------


async def test_unknown_customer_is_a_typed_not_found_with_suggestions(tmp_path: Path) -> None:
    ctx = ctx_for(make_runtime(tmp_path, FakeModel()))
    res = await run_tool(ctx, "next_item", ToolCall(tool="next_item", args={"customer_id": "17859"}).typed_args())
    assert isinstance(res, NotFound) and res.entity == "customer"
    assert "17850" in res.suggestions
    assert res.message.startswith("no customer 17859 in shop; did you mean 17850")
    assert "did you mean" in fallback_answer(res, "en") and "您是不是要找" in fallback_answer(res, "zh")


@pytest.mark.parametrize(("question", "tool", "name"), [
    ("What is the churn risk of customer Bob?", "churn", "Bob"),
    ("Is customer Alice Smith likely to churn?", "churn", "Alice Smith"),
    ("What will client named Bob buy next?", "next_item", "Bob"),
])
async def test_a_customer_named_not_numbered_is_looked_up_not_answered_with_other_customers(
        tmp_path: Path, question: str, tool: str, name: str) -> None:
    """Issue 17: "a non-numeric unknown customer name is answered with a churn list of other
    customers instead of 'no such customer'"."""
    route = rule_route(preparse(question))
    assert (route.tool, route.args.get("customer_id")) == (tool, name)
    ctx = ctx_for(make_runtime(tmp_path, FakeModel()))
    res = await run_tool(ctx, tool, ToolCall(tool=tool, args=route.args).typed_args())
    assert isinstance(res, NotFound) and res.entity == "customer"
    assert res.message.startswith(f"no customer {name} in shop")


async def test_unknown_item_and_missing_args(tmp_path: Path) -> None:
    ctx = ctx_for(make_runtime(tmp_path, FakeModel()))
    res = await run_tool(ctx, "item_lookup", ToolCall(tool="item_lookup", args={"item_id": "85123B"}).typed_args())
    assert isinstance(res, NotFound) and res.suggestions[0].startswith("85123A")
    need = await run_tool(ctx, "next_item", ToolCall(tool="next_item", args={}).typed_args())
    assert isinstance(need, NeedInfo)


async def test_tools_return_typed_results(tmp_path: Path) -> None:
    ctx = ctx_for(make_runtime(tmp_path, FakeModel()))
    tl = await run_tool(ctx, "user_timeline", ToolCall(tool="user_timeline", args={"customer_id": "17850"}).typed_args())
    assert isinstance(tl, Timeline) and tl.n_events == 4 and tl.events[0].item_id == "85123A"
    hits = await run_tool(ctx, "item_search", ToolCall(tool="item_search", args={"query": "lunch bag retrospot"}).typed_args())
    assert isinstance(hits, SearchHits) and hits.hits[0].item_id == "20725"
    title = await run_tool(ctx, "audience", ToolCall(tool="audience", args={"item_query": "regency cakestand 3 tier"}).typed_args())
    assert isinstance(title, Unavailable | NotFound) or title.kind == "task"
    pred = await run_tool(ctx, "next_item", ToolCall(tool="next_item", args={"customer_id": "17850", "k": 2}).typed_args())
    assert isinstance(pred, NextItems) and len(pred.prediction.items) == 2


# ---- the turn and the UI handler ---------------------------------------------------------


async def test_turn_streams_evidence_then_model_answer(tmp_path: Path) -> None:
    fake = FakeModel.with_replies([route_reply("next_item", customer_id="17850"),
                                   "Customer 17850 will likely buy ASSORTED COLOUR BIRD ORNAMENT."])
    rt = make_runtime(tmp_path, fake)
    events = await collect(ChatAgent(ctx_for(rt), fast_routing=False).ask("What will customer 17850 buy next, and why?"))
    kinds = [e.kind for e in events]
    assert kinds[0] == "status" and kinds[-1] == "done" and events[-1].answer_source == "model"
    evidence = [e.result for e in events if e.kind == "evidence"]
    assert isinstance(evidence[0], Timeline) and isinstance(evidence[1], NextItems)
    answer_prompt = fake.calls[-1].messages[-1]["content"]
    assert "E" in answer_prompt and "Continue in English" in answer_prompt  # the why after the ranking


async def test_chinese_question_gets_a_chinese_answer_prompt(tmp_path: Path) -> None:
    fake = FakeModel.with_replies([route_reply("user_timeline", customer_id="12347"), "客户12347买过……"])
    events = await collect(ChatAgent(ctx_for(make_runtime(tmp_path, fake)), fast_routing=False).ask("客户12347都买过什么？"))
    assert "Chinese" in fake.calls[-1].messages[0]["content"]
    assert "".join(e.text for e in events if e.kind == "token") == "客户12347买过……"


def _ui():  # noqa: ANN202 - imported lazily: gradio is the `ui` extra
    return pytest.importorskip("ui.chat.app", reason="gradio not installed (pip install -e '.[ui]')")


async def test_handler_yields_and_shows_evidence_when_the_model_is_down(tmp_path: Path) -> None:
    app = _ui()
    ctl = app.ChatController(make_runtime(tmp_path, ModelUnavailableError("server down")),
                             next_item_config=NextItemConfig(k=3, use_llm_ranking=False, explain=False))
    outs = [o async for o in ctl.respond("What will customer 17850 buy next, and why?", [], DS)]
    assert len(outs) >= 3
    chat, status = outs[-1][:2]
    assert "unavailable" in status and "retrieval" in status
    figs = [o[2] for o in outs if hasattr(o[2], "axes")]
    tables = [o[3] for o in outs if hasattr(o[3], "columns")]
    assert sum(len(c.get_offsets()) for c in figs[-1].axes[0].collections) == 4  # all 4 events drawn
    # evidence shown anyway, with human column names; the model's column is 0 on every row
    assert list(tables[-1]["Product code"]) and "Bought together" in tables[-1].columns
    assert "Model" not in tables[-1].columns and outs[-1][4]["value"] == "Same on every row: Model = 0.0"
    assert "most likely to buy next" in chat[-1]["content"]
    # the last frame carries every panel whole (Gradio sends a run's last values in full), so a
    # mid-stream update the browser missed is restored at the end
    assert hasattr(outs[-1][2], "axes") and list(outs[-1][3]["Product code"]) == list(tables[-1]["Product code"])
    # the shown table is the CSV download, read back equal
    csv = outs[-1][7]
    assert csv["visible"] and Path(csv["value"]).name.startswith("shoplens-next_item")
    back = pd.read_csv(csv["value"], encoding="utf-8-sig", dtype={"Product code": str})
    assert list(back.columns) == list(tables[-1].columns)
    assert list(back["Product code"]) == list(tables[-1]["Product code"])
    bars = outs[-1][5]
    assert bars["visible"] and len(bars["value"]) == len(tables[-1]) and bars["label"] == "Score of each predicted item"


async def test_handler_always_yields_even_when_a_tool_crashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _ui()
    rt = make_runtime(tmp_path, FakeModel.with_replies([route_reply("item_search", query="bag")]))

    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("index exploded")

    monkeypatch.setattr("agent.chat.tools.search_items", boom)
    outs = [o async for o in app.ChatController(rt).respond("find bags", [], DS)]
    assert "index exploded" in outs[-1][1]
    empty = [o async for o in app.ChatController(rt).respond("   ", [], DS)]
    assert len(empty) == 1 and "Type a question" in empty[0][1]


async def test_titles_and_questions_are_escaped(tmp_path: Path) -> None:
    app = _ui()
    from ui.chat.render import safe_md

    assert "<" not in safe_md(EVIL) and "&lt;img" in safe_md(EVIL)
    assert "](" not in safe_md("[x](javascript:alert(1))")
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    outs = [o async for o in app.ChatController(rt).respond(
        "Show the purchase history of customer 17850 <script>alert(1)</script>", [], DS)]
    chat = outs[-1][0]
    text = json.dumps(chat)
    assert "CANDLE" in text  # the evil title is shown ...
    assert "<script" not in text and "<img" not in text  # ... as text
    assert "](javascript" not in text


def test_parsed_question_defaults() -> None:
    p = ParsedQuestion(question="x", language="en")
    assert p.customer_ids == [] and p.month is None


async def test_task_tools_wrap_the_tasks_service(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    ctx = ToolContext(rt, ShopLensService(rt, use_model=False), DS)
    prof = await run_tool(ctx, "profile", ToolCall(tool="profile", args={"customer_id": "12347"}).typed_args())
    assert prof.kind == "task" and prof.data["user_id"] == "12347"  # type: ignore[union-attr]
    cohort = await run_tool(ctx, "churn", ToolCall(tool="churn", args={"month": 10}).typed_args())
    assert isinstance(cohort, ChurnSegment) and cohort.month == 10  # no customer: the cohort tool
    need = await run_tool(ctx, "intent", ToolCall(tool="intent", args={"customer_id": "12347"}).typed_args())
    assert isinstance(need, NeedInfo)


async def test_slow_stream_reports_progress_and_stop_cancels_it() -> None:
    import asyncio

    from agent.chat.router import _stream_heartbeat

    closed: list[bool] = []

    async def slow() -> Any:
        try:
            yield "a"
            await asyncio.sleep(0.35)
            yield "b"
            await asyncio.sleep(60)
            yield "never"
        finally:
            closed.append(True)

    got: list[Any] = []
    agen = _stream_heartbeat(slow(), "answer", 0.1)
    async for x in agen:
        got.append(x)
        if x == "b":
            break
    await agen.aclose()  # what Gradio's Stop does to the handler
    assert got[0] == "a" and got[-1] == "b"
    assert any(isinstance(x, ChatEvent) and "still working" in x.text for x in got)
    await asyncio.sleep(0)
    assert closed == [True]


def test_route_prompt_snapshot() -> None:
    """The rendered routing prompt is pinned: a change shows up here (then add chat_route.v2)."""
    import hashlib

    from agent.chat.tools import TOOLS
    from agent.llm.prompting import load_prompt, render

    p = preparse("客户17850接下来可能买什么？为什么？")
    messages = render(load_prompt("chat_route.v1"),
                      tools=[{"name": n, "description": t.description} for n, t in TOOLS.items()],
                      question=p.question, customer_ids=p.customer_ids, item_ids=p.item_ids)
    digest = hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()[:16]
    assert "Customer ids found in the question: 17850" in messages[1]["content"]
    # 7b906fee68eebe34: the tool list gained churn_segment and item_sentiment (template unchanged)
    assert digest == "7b906fee68eebe34", "\n\n".join(m["content"] for m in messages)


# ---- item_sentiment and churn_segment ------------------------------------------------------

SENTIMENT_Q = "How do people feel about item B0009RF9DW? What do they complain about?"
SEGMENT_Q = "Which customers who bought in October are at risk of churning?"


def add_reviews(rt: Runtime) -> None:
    """22423 gets 6 reviews: stars 1, 2 (with markup), 3, 5, 4, and one unrated negative text."""
    reviews = [("r1", 1.0, "Broke on arrival. Mail me at ann@example.com", 5),
               ("r2", 2.0, "<script>alert(1)</script>Wobbly tiers, cheap plastic", 6),
               ("r3", 3.0, "ok I guess", 7), ("r4", 5.0, "Lovely", 8), ("r5", 4.0, "nice", 9),
               ("r6", None, "terrible, broken and awful, a waste of money", 10)]
    rt.store.add_events(DS, [
        BehaviorEvent(event_id=eid, user_id=f"9{n:04d}", item_id="22423", event_type="review", rating=stars,
                      review_text=text, timestamp=datetime(2011, 10, day, tzinfo=UTC))
        for n, (eid, stars, text, day) in enumerate(reviews)])


async def test_item_sentiment_counts_trend_and_complaints(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, FakeModel())
    add_reviews(rt)
    res = await run_tool(rt_ctx := ctx_for(rt), "item_sentiment",
                         ToolCall(tool="item_sentiment", args={"item_id": "22423"}).typed_args())
    assert isinstance(res, ItemSentiment)
    assert res.n_reviews == 6 and res.from_text == 1
    assert res.counts == {"negative": 3, "neutral": 1, "positive": 2}
    # lowest stars first; the unrated one counts as 2 stars, and is newer than r2
    assert [c.event_id for c in res.complaints] == ["r1", "r6", "r2"]
    assert "[email]" in res.complaints[0].excerpt and "ann@example.com" not in res.complaints[0].excerpt
    assert "<script>" not in res.complaints[2].excerpt and "Wobbly tiers" in res.complaints[2].excerpt
    assert res.evidence[:3] == ["r1", "r6", "r2"] and set(res.evidence) == {f"r{i}" for i in range(1, 7)}
    assert len(res.trend) == 4 and res.trend[-1]["n"] == 6 and res.trend[-1]["negative"] == 3
    assert "3 negative" in fallback_answer(res, "en") and "差评 3" in fallback_answer(res, "zh")
    from ui.chat.render import items_frame

    assert list(items_frame(res)["review_event"]) == ["r1", "r6", "r2"]  # type: ignore[index]
    none = await run_tool(rt_ctx, "item_sentiment", ToolCall(tool="item_sentiment", args={"item_id": "84879"}).typed_args())
    assert isinstance(none, ItemSentiment) and none.n_reviews == 0 and "no reviews" in fallback_answer(none, "en")


async def test_item_sentiment_unknown_item_suggests_reviewed_items(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, FakeModel())
    add_reviews(rt)
    res = await run_tool(ctx_for(rt), "item_sentiment",
                         ToolCall(tool="item_sentiment", args={"item_id": "B0009RF9DW"}).typed_args())
    assert isinstance(res, NotFound) and res.entity == "item"
    assert res.suggestions == ["22423: REGENCY CAKESTAND 3 TIER"]  # the only item with reviews


SEG = "seg"


def make_segment_store(rt: Runtime) -> None:
    """A: orders 09-01, 10-02; B: 10-30; C: 08-01, 09-01, 10-30; D: 09-15 only; E: 11-05 only."""
    rt.store.add_items(SEG, [CatalogItem(item_id="X1", title="MUG", price=1.5)])
    days = {"A": [(9, 1), (10, 2)], "B": [(10, 30)], "C": [(8, 1), (9, 1), (10, 30)],
            "D": [(9, 15)], "E": [(11, 5)]}
    rt.store.add_events(SEG, [
        BehaviorEvent(event_id=f"{u}{m}-{d}", user_id=u, item_id="X1", event_type="purchase", quantity=1,
                      unit_price=1.5, timestamp=datetime(2011, m, d, tzinfo=UTC))
        for u, ds in days.items() for m, d in ds])


async def test_churn_segment_ranks_october_buyers_by_baseline_risk(tmp_path: Path) -> None:
    import math

    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    make_segment_store(rt)
    ctx = ToolContext(rt, ShopLensService(rt, use_model=False), SEG)
    res = await run_tool(ctx, "churn_segment", ToolCall(tool="churn_segment", args={"month": 10}).typed_args())
    assert isinstance(res, ChurnSegment)
    assert (res.year, res.month, res.as_of[:10], res.n_buyers) == (2011, 10, "2011-11-01", 3)  # not D, not E
    assert res.baseline == "hand-set prior"  # too little history to fit one

    def p(recency: float, orders: int, spend: float) -> float:  # default_churn_baseline by hand
        z = -2.5 + 0.9 * math.log1p(recency) - 0.8 * math.log1p(orders) - 0.1 * math.log1p(spend)
        return 1 / (1 + math.exp(-z))

    want = {"A": p(30, 2, 3.0), "B": p(2, 1, 1.5), "C": p(2, 3, 4.5)}  # 0.395, 0.104, 0.058
    assert [c.customer_id for c in res.customers] == ["A", "B", "C"]
    for c in res.customers:
        assert c.probability == pytest.approx(want[c.customer_id], abs=1e-4)
    a = res.customers[0]
    assert (a.recency_days, a.n_orders, a.last_purchase_event) == (30.0, 2, "A10-2")
    # drivers: the baseline's logit contributions against the month's median buyer (recency 2 days,
    # 2 orders, 3.00 spent); |contribution| <= 0.1 is neutral and left out. A: 0.9*(ln 31 - ln 3)
    # = +2.10 by recency; B: -0.8*(ln 2 - ln 3) = +0.32 by frequency (spend: +0.047, neutral);
    # C: -0.8*(ln 4 - ln 3) = -0.23, lower risk than the median buyer by frequency.
    assert a.drivers == ["recency: 30 days since the last order (median 2) (raises risk)"]
    assert res.customers[1].drivers == ["frequency: 1 order in total (median 2) (raises risk)"]
    assert res.customers[2].drivers == ["frequency: 3 orders in total (median 2) (lowers risk)"]
    assert "A" in fallback_answer(res, "en") and "流失风险" in fallback_answer(res, "zh")
    from ui.chat.render import items_frame

    assert list(items_frame(res)["customer_id"]) == ["A", "B", "C"]  # type: ignore[index]
    top1 = await run_tool(ctx, "churn_segment", ToolCall(tool="churn_segment", args={"month": 10, "n": 1}).typed_args())
    assert [c.customer_id for c in top1.customers] == ["A"] and top1.n_buyers == 3  # type: ignore[union-attr]


def test_issue_examples_route_to_the_new_tools_by_keywords() -> None:
    assert rule_route(preparse(SENTIMENT_Q)) == ToolCall(tool="item_sentiment", args={"item_id": "B0009RF9DW"})
    assert rule_route(preparse(SEGMENT_Q)) == ToolCall(tool="churn_segment", args={"month": 10})
    assert rule_route(preparse("Is customer 12583 likely to stop buying from us?")).tool == "churn"


async def test_model_route_maps_the_old_names_to_the_new_tools() -> None:
    fake = FakeModel.with_replies([route_reply("sentiment", item_id="B0009RF9DW"), route_reply("churn")])
    route = await model_route(fake, preparse(SENTIMENT_Q))
    assert route.call == ToolCall(tool="item_sentiment", args={"item_id": "B0009RF9DW"})
    assert "sentiment" in (fake.calls[0].schema or {})["properties"]["tool"]["enum"]
    route = await model_route(fake, preparse(SEGMENT_Q))
    assert route.call == ToolCall(tool="churn_segment", args={"month": 10})


async def test_segment_question_end_to_end_without_a_model(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    make_segment_store(rt)
    ctx = ToolContext(rt, ShopLensService(rt, use_model=False), SEG)
    events = await collect(ChatAgent(ctx, use_model=False).ask(SEGMENT_Q))
    results = [e.result for e in events if e.kind == "evidence"]
    assert isinstance(results[-1], ChurnSegment) and results[-1].customers[0].customer_id == "A"
    answer = "".join(e.text for e in events if e.kind == "token")
    assert answer.startswith("[template] Of the 3 customers who bought in 2011-10")


# ---- the verified answer (agent/chat/checked.py) -------------------------------------------


def test_split_sentences_keeps_list_numbers_and_decimals_whole() -> None:
    from agent.chat.checked import split_sentences

    assert split_sentences("1. LUNCH BAG at 0.85 each. Then 2. JUMBO BAG") == (["1. LUNCH BAG at 0.85 each. "],
                                                                               "Then 2. JUMBO BAG")
    assert split_sentences("第一句。第二句") == (["第一句。"], "第二句")
    assert split_sentences("a line\nnext") == (["a line\n"], "next")
    # a lead-in ending with a colon stays with the list's first line (its claim names that item)
    assert split_sentences("Most likely to buy:\n1. HAND WARMER\n2. MUG\n") == (
        ["Most likely to buy:\n1. HAND WARMER\n", "2. MUG\n"], "")
    assert split_sentences("最有可能的下一次购买是：\n\n1. HAND WARMER\n") == (["最有可能的下一次购买是：\n\n1. HAND WARMER\n"], "")
    assert split_sentences("Buy: \n") == ([], "Buy: \n")  # a lead-in waits for its list


async def _next_item_turn(tmp_path: Path, answers: list[str], *, facts_first: bool = False,
                          question: str = "What will customer 17850 buy next, and why?"
                          ) -> tuple[list[ChatEvent], FakeModel]:
    """One next-item turn on the fake model; facts_first=False: the model writes the whole answer
    (the verifier's own path, tested below), True: the served default (ranking from the template)."""
    fake = FakeModel.with_replies([route_reply("next_item", customer_id="17850"), *answers])
    rt = make_runtime(tmp_path, fake)
    cfg = NextItemConfig(k=3, use_llm_ranking=False, explain=False)
    events = await collect(ChatAgent(ToolContext(rt, ShopLensService(rt), DS, cfg), facts_first=facts_first,
                                      fast_routing=False).ask(question))
    return events, fake


async def test_a_next_item_answer_opens_with_the_templates_ranking_and_the_model_says_why(tmp_path: Path) -> None:
    plain, _ = await _next_item_turn(tmp_path / "a", ["Fine."])
    items = next(e.result for e in plain if isinstance(e.result, NextItems)).prediction.items
    why = f"It goes with the {items[1].title} theme."
    events, fake = await _next_item_turn(tmp_path / "b", [why], facts_first=True)
    tokens = [e for e in events if e.kind == "token"]
    head = (f"Customer 17850 is most likely to buy {items[0].title}, then {items[1].title} and "
            f"{items[2].title}. ")
    assert (tokens[0].text, tokens[0].source) == (head, "facts")
    assert [(t.text, t.source) for t in tokens[1:]] == [(why, "model")]
    prompt = fake.calls[-1].messages
    assert "Already written: " + head.strip() in prompt[-1]["content"] and "say why" in prompt[0]["content"]
    v = events[-1].verification
    assert v is not None and (v.checked, v.verified) == (1, 1) and events[-1].answer_source == "model"
    # the model's "why" is still verified: a claim that #3 is most likely is replaced, and the
    # template follows the ranking on a new paragraph, labelled
    wrong = f"But {items[2].title} is the most likely one."
    events, _ = await _next_item_turn(tmp_path / "c", [wrong, wrong], facts_first=True)
    tokens = [e for e in events if e.kind == "token"]
    assert [t.source for t in tokens] == ["facts", "template"]
    assert tokens[1].text.startswith("\n\n[template] Customer 17850 is most likely to buy next:")
    zh, _ = await _next_item_turn(tmp_path / "d", ["因为它们都与 E1 有关。"], facts_first=True,
                                  question="客户17850接下来可能买什么？为什么？")
    assert zh[-1].kind == "done" and next(e for e in zh if e.kind == "token").text == (
        f"客户 17850 接下来最可能购买 {items[0].title}，其次是 {items[1].title} 和 {items[2].title}。 ")


async def test_a_wrong_chat_sentence_is_never_shown_and_the_answer_is_repaired_once(tmp_path: Path) -> None:
    plain, _ = await _next_item_turn(tmp_path / "a", ["Fine."])
    top = next(e.result for e in plain if isinstance(e.result, NextItems)).prediction.items
    other = next(t for i, t in CATALOG.items() if i not in {x.item_id for x in top} and "<" not in t)
    first = f"Customer 17850 will likely buy {top[0].title}. "
    wrong = f"It is the most likely buy after the {other}. "
    events, fake = await _next_item_turn(tmp_path / "b", [first + wrong + "More text.", "It matches the heart theme."])
    shown = "".join(e.text for e in events if e.kind == "token")
    assert shown == first + "It matches the heart theme."
    repair = fake.calls[-1].messages
    assert repair[-2] == {"role": "assistant", "content": first + wrong}
    assert f"names '{other}', which is not the product explained or an event it cites" in repair[-1]["content"]
    done = events[-1]
    assert done.answer_source == "model" and done.verification is not None
    assert (done.verification.checked, done.verification.verified, done.verification.repaired,
            done.verification.replaced) == (3, 2, 1, 0)


async def test_a_chat_sentence_wrong_after_its_repair_gives_way_to_the_labelled_template(tmp_path: Path) -> None:
    plain, _ = await _next_item_turn(tmp_path / "a", ["Fine."])
    items = next(e.result for e in plain if isinstance(e.result, NextItems)).prediction.items
    # the table's #3 called the most likely: the issue's "most likely to buy ... KEEP CALM" (#5)
    wrong = f"客户17850最可能购买 {items[-1].title}。"
    events, _ = await _next_item_turn(tmp_path / "b", [wrong, "他会买 99 件。"])
    shown = "".join(e.text for e in events if e.kind == "token")
    assert items[-1].title not in shown.split("\n")[0] and "99" not in shown
    assert shown.startswith("[template] Customer 17850 is most likely to buy next:")
    v = events[-1].verification
    assert v is not None and (v.checked, v.replaced) == (1, 1) and events[-1].answer_source == "template"
    assert any(f"does not name the top-ranked item '{items[0].title}' first" in x for x in v.violations)
    assert any(x.startswith("repair: ") and "states 99" in x for x in v.violations)


def test_the_status_line_says_what_the_verifier_did() -> None:
    from agent.domain.predictions.common import Verification

    app = _ui()
    v = Verification(checked=3, verified=2, repaired=1, replaced=0)
    ok = app.done_status(ChatEvent("done", answer_source="model", verification=v), "en")
    assert ok.startswith("✅ done · 3 of 3 sentences verified") and "1 after a repair" in ok  # markdown-escaped
    bad = Verification(checked=1, verified=0, repaired=0, replaced=1)
    assert app.done_status(ChatEvent("done", answer_source="template", verification=bad), "en").startswith(
        "⚠️ The model's answer failed the verifier, so the labelled template answer is shown · 0 of 1")
    assert "retrieval only" in app.done_status(ChatEvent("done", "down", answer_source="template"), "en")


@pytest.mark.parametrize(("question", "month"), [
    ("Which customers are at risk of churning this month?", 12),
    ("Who bought last month and may churn?", 11),
    ("本月谁会流失？", 12),
    ("上个月买过的客户谁会流失？", 11),
    ("Who bought in October?", 10),  # a named month wins
])
def test_relative_months_are_read_against_the_datasets_end(question: str, month: int) -> None:
    end = datetime(2011, 12, 9, tzinfo=UTC)
    assert preparse(question, today=end).month == month
    assert preparse("Which customers are at risk of churning this month?").month is None  # no end known


async def test_an_answer_cut_by_the_token_limit_is_finished_by_the_repair_not_shown_cut(tmp_path: Path) -> None:
    from agent.chat.checked import Outcome, checked_answer
    from agent.domain.verify import Facts, TitleIndex

    words = " ".join(["word"] * 9)  # with "All good." 11 chunks (the fake streams a word a chunk): the limit
    fake = FakeModel.with_replies([f"All good. {words}", "Finished."])
    out = Outcome()
    shown = [x async for x in checked_answer(fake, [{"role": "user", "content": "q"}], Facts(titles=[]),
                                               TitleIndex([]), "TEMPLATE", "en", out, max_tokens=11)]
    assert "".join(shown) == "All good. Finished."
    assert out.repaired == 1 and "is cut off at the 11-token limit mid-sentence" in out.violations[0]


# ---- follow-ups and time windows ------------------------------------------------------------


@pytest.mark.parametrize(("question", "days", "month"), [
    ("Which customers who bought in the last 30 days are at risk of churning?", 30, None),
    ("最近30天买过的客户中哪些有流失风险？", 30, None),
    ("at-risk customers from the past 2 weeks", 14, None),
    ("上周买过的客户谁会流失？", 7, None),
    ("customers who bought in October", None, 10),
    ("the last 0 days", 1, None),  # clamped to the tool's 1..366, and said in the answer
    ("last 400 days", 366, None),
    ("last 3 months", 90, None),
    ("which customers who bought in the last 12347 days will churn?", 366, None),
])
def test_preparse_reads_a_window_of_days(question: str, days: int | None, month: int | None) -> None:
    p = preparse(question)
    assert (p.days, p.month) == (days, month)


async def test_a_last_30_days_segment_counts_back_from_the_datas_end(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    make_segment_store(rt)  # the data ends 2011-11-05 (E); B and C bought 10-30, A 10-02, D 09-15
    ctx = ToolContext(rt, ShopLensService(rt, use_model=False), SEG)
    events = await collect(ChatAgent(ctx, use_model=False).ask(
        "Which customers who bought in the last 30 days are at risk of churning?"))
    seg = next(e.result for e in events if isinstance(e.result, ChurnSegment))
    assert seg.days == 30 and seg.start is not None and seg.start[:10] == "2011-10-06"
    assert sorted(c.customer_id for c in seg.customers) == ["B", "C", "E"] and seg.n_buyers == 3  # not A (10-02)
    answer = "".join(e.text for e in events if e.kind == "token")
    assert "bought in the last 30 days (2011-10-06 to 2011-11-05)" in answer
    zh = await collect(ChatAgent(ctx, use_model=False).ask("最近30天买过的客户中哪些有流失风险？"))
    assert "最近30天（2011-10-06至2011-11-05）有购买的 3 位客户中" in "".join(e.text for e in zh if e.kind == "token")


async def test_follow_ups_keep_the_conversations_customer_and_tool(tmp_path: Path) -> None:
    from agent.chat.router import Conversation

    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    agent, conv = ChatAgent(ctx_for(rt), use_model=False), Conversation()

    async def turn(q: str) -> tuple[Route, ToolResult]:
        events = await collect(agent.ask(q, conv))
        route = next(e.route for e in events if e.route is not None)
        return route, [e.result for e in events if e.result is not None][-1]

    route, res = await turn("What will customer 17850 buy next, and why?")
    assert route.call == ToolCall(tool="next_item", args={"customer_id": "17850", "k": 5})
    assert route.source == "keywords"  # unambiguous: no routing call needed
    # a new task about "his": the customer is carried over, and the route says so
    route, res = await turn("And what is his churn risk?")
    assert route.call.tool == "churn" and route.call.args["customer_id"] == "17850"
    assert route.note is not None and "customer 17850 from earlier in the conversation" in route.note
    # no task named: the same tool for the new customer, without routing
    route, res = await turn("What about customer 12347?")
    assert route.source == "context" and route.call == ToolCall(tool="churn", args={"customer_id": "12347"})
    assert (conv.customer_id, conv.tool) == ("12347", "churn")
    route, _ = await turn("那13047呢？")
    assert route.call.args["customer_id"] == "13047" and route.call.tool == "churn"
    route, _ = await turn("Which items will he buy next?")  # "which" about items: his
    assert route.call.tool == "next_item" and route.call.args["customer_id"] == "13047"
    # a question about several customers never inherits one
    route, _ = await turn("Which customers are at risk of churning?")
    assert route.call.tool == "churn_segment" and "customer_id" not in route.call.args
    # a product, then "it"
    route, res = await turn("How do people feel about item 22423?")
    assert conv.item_id == "22423"
    route, _ = await turn("Who should we target for it?")
    assert route.call == ToolCall(tool="audience", args={"item_id": "22423"})
    # an unknown customer is not remembered
    await turn("What about customer 99999?")
    assert conv.customer_id == "13047"


async def test_without_a_conversation_nothing_is_carried(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    events = await collect(ChatAgent(ctx_for(rt), use_model=False).ask("And what is his churn risk?"))
    res = [e.result for e in events if e.result is not None][-1]
    assert isinstance(res, NeedInfo)  # "his" names no one: which customer? (no customer made up)


async def test_each_turn_is_logged_and_counted_without_the_questions_text(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = _ui()
    from ui.api.metrics import Metrics

    metrics, records = Metrics(), []

    def on_turn(rec: Any) -> None:
        records.append(rec)
        metrics.chat_turn(rec)

    ctl = app.ChatController(make_runtime(tmp_path, ModelUnavailableError("down")), on_turn=on_turn,
                             next_item_config=NextItemConfig(k=3, use_llm_ranking=False, explain=False))
    caplog.set_level("INFO", logger="ui.chat.app")
    question = "What will customer 17850 (jane@example.com) buy next?"
    _ = [o async for o in ctl.respond(question, [], DS, None, "key-7")]
    _ = [o async for o in ctl.respond("   ", [], DS, None, "key-7")]
    first, empty = records
    assert (first.user, first.dataset, first.tool, first.route_source, first.answer_source, first.outcome) == (
        "key-7", DS, "next_item", "keywords", "template", "answered")
    assert first.seconds > 0 and (empty.outcome, empty.tool) == ("refused", None)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("chat turn"))
    assert logged.count("chat turn") == 2 and "'tool': 'next_item'" in logged
    assert "jane@example.com" not in logged and "buy next" not in logged
    value = metrics.registry.get_sample_value
    assert value("shoplens_chat_turns_total", {"tool": "next_item", "outcome": "answered",
                                               "answer_source": "template"}) == 1.0
    assert value("shoplens_chat_turns_total", {"tool": "none", "outcome": "refused", "answer_source": "none"}) == 1.0
    assert value("shoplens_chat_turn_duration_seconds_count", {"tool": "next_item"}) == 1.0


async def test_task_answers_read_as_text_not_json_in_both_languages(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    agent = ChatAgent(ctx_for(rt), use_model=False)

    async def answer(q: str) -> str:
        return "".join(e.text for e in await collect(agent.ask(q)) if e.kind == "token")

    en = await answer("Who should we target for the REGENCY CAKESTAND 3 TIER?")
    # 17850 and 17851 bought it (repeat + co-purchase), 13047 and 12347 bought what is bought with it
    assert en.splitlines()[:3] == [
        "[template] Customers to target for REGENCY CAKESTAND 3 TIER (22423) (4, best first):",
        "1. customer 17850 (score 1.00): [retrieval] Bought REGENCY CAKESTAND 3 TIER before.",
        "2. customer 17851 (score 0.86): [retrieval] Bought REGENCY CAKESTAND 3 TIER before."]
    assert "{" not in en
    zh = await answer("谁是 REGENCY CAKESTAND 3 TIER 的目标人群？")
    assert zh.startswith("[模板] REGENCY CAKESTAND 3 TIER (22423) 的目标客户（共 4 位，按得分排序）：\n1. 客户 17850（得分 1.00）")
    churn = await answer("客户17850有流失风险吗？")
    assert churn.startswith("[模板] 客户 17850 在 90 天内不再购买的概率为 5%（低风险，截至 2011-10-04）；建议：无需行动。")
    assert "- frequency: 3 orders in total, 3 in the last 90 days (lowers risk)" in churn
    profile = await answer("Describe customer 12347's shopping style.")
    assert profile.startswith("[template] Customer 12347 (new): ") and "- interest: bag (inferred)" in profile


def test_the_status_line_speaks_the_questions_language() -> None:
    app = _ui()
    from agent.domain.predictions.common import Verification

    v = Verification(checked=3, verified=1, repaired=1, replaced=1, violations=[])
    ev = ChatEvent("done", "", answer_source="model", verification=v)
    assert app.done_status(ev, "en") == ("⚠️ done · 2 of 3 sentences verified \\(1 after a repair\\), 1 replaced by "
                                         "the labelled template")
    assert app.done_status(ev, "zh") == "⚠️ 完成 · 3 句中 2 句已核实（1 句经一次修正），1 句由标注的模板替换"
    down = ChatEvent("done", "model disabled", answer_source="template")
    assert "retrieval only" in app.done_status(down, "zh") and "模型不可用" in app.done_status(down, "zh")


async def test_a_follow_up_that_names_another_kind_of_target_is_routed_afresh(tmp_path: Path) -> None:
    from agent.chat.router import Conversation

    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    agent, conv = ChatAgent(ctx_for(rt), use_model=False), Conversation()

    async def route(q: str) -> Route:
        events = await collect(agent.ask(q, conv))
        return next(e.route for e in events if e.route is not None)

    await route("Describe customer 12347's shopping style.")
    r = await route("What about item 22423?")  # an item, not the profile's customer
    assert r.call == ToolCall(tool="item_lookup", args={"item_id": "22423"}) and r.source == "rules"
    await route("Who should we target for the REGENCY CAKESTAND 3 TIER?")
    r = await route("What about customer 17850?")  # a customer, not the audience's item
    assert r.call.tool == "user_timeline" and r.call.args["customer_id"] == "17850"
    await route("What will customer 17850 buy next?")
    r = await route("what did customer 17850 buy in the last 30 days?")  # a window: routed afresh
    assert r.source == "rules" and r.call.tool != "next_item"
    # the note names only what the call uses
    await route("Which customers are at risk of churning?")
    r = await route("why?")
    assert r.call.tool == "churn_segment" and "customer" not in (r.note or "")
    # a turn on another dataset starts the conversation afresh
    make_segment_store(rt)
    seg = ChatAgent(ToolContext(rt, ShopLensService(rt, use_model=False), SEG), use_model=False)
    events = await collect(seg.ask("And his churn risk?", conv))
    assert conv.dataset == SEG and not any(isinstance(e.result, NotFound) for e in events)


async def test_his_churn_risk_with_no_customer_known_asks_which_customer(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path, ModelUnavailableError("down"))
    events = await collect(ChatAgent(ctx_for(rt), use_model=False).ask("And what is his churn risk?"))
    res = [e.result for e in events if e.result is not None][-1]
    assert isinstance(res, NeedInfo) and res.missing == "customer_id"
    events = await collect(ChatAgent(ctx_for(rt), use_model=False).ask("Which customers are at risk of churning?"))
    assert isinstance([e.result for e in events if e.result is not None][-1], ChurnSegment)


def test_an_items_details_read_in_chinese_too() -> None:
    from agent.chat.results import ItemDetails, ItemInfo

    r = ItemDetails(dataset="shop", n_customers=2, item=ItemInfo(item_id="22423", title="REGENCY CAKESTAND 3 TIER",
                                                                 price=12.75))
    assert fallback_answer(r, "zh") == "商品 22423：REGENCY CAKESTAND 3 TIER，价格 12.75；shop 中有 2 位客户与它有过互动。"
    assert fallback_answer(r, "en") == "Item 22423: REGENCY CAKESTAND 3 TIER, price 12.75; 2 customers in shop have events on it."


def test_the_keyword_route_decides_only_what_it_gets_right_on_the_routing_questions() -> None:
    from agent.chat.router import keyword_route
    from eval.routing_eval import judge

    store_users, store_items = {"17850", "12347", "13047", "12583", "14911", "15311"}, set(CATALOG) | {
        "84879", "85123A", "22423", "20725", "22386", "21212", "B0009RF9DW"}
    decided, wrong = 0, []
    for q in load_questions():
        parsed = preparse(q["question"], has_user=lambda u: u in store_users, has_item=lambda i: i in store_items)
        call = keyword_route(parsed)
        if call is not None:
            decided += 1
            if not judge(q, call)["correct"]:
                wrong.append((q["question"], call))
    # it decides most questions (the model routes the rest) and is never wrong on them
    assert decided >= 30 and wrong == [], wrong


async def test_an_unambiguous_question_skips_the_routing_call_but_not_the_answer(tmp_path: Path) -> None:
    fake = FakeModel.with_replies(["It matches the recent orders."])  # one call: the why; no routing reply
    rt = make_runtime(tmp_path, fake)
    events = await collect(ChatAgent(ctx_for(rt)).ask("What will customer 17850 buy next, and why?"))
    route = next(e.route for e in events if e.route is not None)
    assert route.source == "keywords" and route.call.tool == "next_item" and len(fake.calls) == 1
    assert events[-1].answer_source == "model"
    # ambiguous (two tools' keywords): the model routes
    fake2 = FakeModel.with_replies([route_reply("audience", item_id="22423"), "Fine."])
    events = await collect(ChatAgent(ctx_for(make_runtime(tmp_path / "b", fake2))).ask(
        "我们想促销商品22423，该找哪些顾客？"))
    assert next(e.route for e in events if e.route is not None).source == "model"
