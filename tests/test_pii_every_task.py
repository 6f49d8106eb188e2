"""No e-mail address or phone number from stored or inline review text reaches any prompt, for
every task, through the one service facade, the chat and the API.

The store holds the raw text (as `shoplens ingest` stores it: the API masks at ingest, loaders do
not), so the masking under test is the service's one `history()`. A `FakeModel` (behind the real
guard) answers every call plausibly, so every task takes its model path and renders its prompts;
the assertions read the fake's call log.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.chat.router import ChatAgent
from agent.chat.tools import ToolContext
from agent.domain.predictions import explanation_schema_labels
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeCall, FakeModel, Reply
from agent.settings import Settings
from agent.tasks.next_item import NextItemConfig
from ui.api import ApiSettings, create_app

DS = "pii-shop"
EMAIL, PHONE = "ann.lee@example.com", "+44 20 7946 0958"
PII_TEXT = f"Lovely mug, arrived fast. Questions? mail {EMAIL} or call {PHONE}"
LEAKS = [EMAIL, "ann.lee", PHONE, "7946", "0958", "20 7946"]
USER, OTHER, ITEM = "17850", "12347", "85123A"
CATALOG = {
    "85123A": "WHITE HANGING HEART T-LIGHT HOLDER", "22423": "REGENCY CAKESTAND 3 TIER",
    "20725": "LUNCH BAG RED RETROSPOT", "22386": "JUMBO BAG PINK POLKADOT",
    "84879": "ASSORTED COLOUR BIRD ORNAMENT", "21212": "PACK OF 72 RETROSPOT CAKE CASES",
    "22720": "SET OF 3 CAKE TINS PANTRY DESIGN", "47566": "PARTY BUNTING",
}
T0 = datetime(2011, 10, 1, 9, tzinfo=UTC)
TOP = {**{chr(65 + i): math.log(0.5 / (i + 1)) for i in range(20)}, "yes": math.log(0.6), "no": math.log(0.3),
       "negative": math.log(0.1), "positive": math.log(0.8), "neutral": math.log(0.1)}


def respond(call: FakeCall) -> Reply:
    """A plausible answer to every call any task (or the chat) makes."""
    if call.top_logprobs:  # verbalizers: next-item letters, yes/no, sentiment polarity
        return Completion(text="A", top_logprobs=[TOP], usage=Usage(50, 1), model="fake")
    props = (call.schema or {}).get("properties", {})
    if "reasons" in props:  # next-item explanation: one reason per label, citing the last event
        labels = explanation_schema_labels(call.schema or {})
        ans: dict[str, Any] = {"reasons": [{"item": lab, "why": "matches recent purchases"} for lab in labels],
                               "intent_summary": "Buys home decorations."}
    elif "tool" in props:  # chat routing: the tool the question names, ids from the pre-parser's enums
        question = call.messages[-1]["content"]
        tool = next((t for k, t in (("style", "profile"), ("history", "user_timeline"), ("feel", "item_sentiment"),
                                    ("next", "next_item")) if k in question), "next_item")
        ids = props["customer_id"].get("enum") or [None]
        items = props["item_id"].get("enum") or [None]
        ans = {"tool": tool, "customer_id": ids[0], "item_id": items[0], "query": None}
    elif "stage" in props:
        ans = {"stage": "considering", "reason": "Looked at this item recently.", "evidence": ["E1"]}
    elif "action" in props:
        ans = {"action": "loyalty_reward", "reason": "Orders regularly.", "evidence": ["E1"]}
    elif "summary" in props:
        ans = {"summary": "Buys home decorations in small orders.",
               "claims": [{"text": "Reorders decorations.", "evidence": ["E1"], "inferred": False}]}
    elif "aspects" in props:
        ans = {"aspects": []}
    elif call.schema is not None:
        ans = {"reason": "Bought similar items before.", "evidence": ["E1"]}
    else:  # the chat's streamed answer
        return Completion(text="Here is what the shop's data shows.", usage=Usage(80, 8), model="fake")
    return Completion(text=json.dumps(ans), usage=Usage(80, 20), model="fake")


class FakeRuntime(Runtime):
    """The real runtime and guard, with the fake model behind it."""

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.fake = FakeModel(responder=respond)

    async def connect_model(self) -> FakeModel:
        return self.fake


def _events() -> list[BehaviorEvent]:
    evs = []
    buyers = {USER: ["85123A", "22423", "20725", "22386", "85123A"], OTHER: ["85123A", "84879", "21212"],
              "13047": ["85123A", "22720", "47566"], "14688": ["22423", "85123A", "20725"]}
    for u, items in buyers.items():
        for d, i in enumerate(items):
            ts = T0 + timedelta(days=3 * d)
            evs.append(BehaviorEvent(user_id=u, item_id=i, event_type="view", timestamp=ts))
            evs.append(BehaviorEvent(user_id=u, item_id=i, event_type="purchase", quantity=2, unit_price=2.5,
                                     timestamp=ts + timedelta(minutes=5)))
    last = T0 + timedelta(days=20)
    evs += [BehaviorEvent(user_id=u, item_id=ITEM, event_type="review", rating=5, review_text=PII_TEXT,
                          timestamp=last + timedelta(hours=h)) for h, u in enumerate((USER, OTHER, "13047"))]
    evs += [BehaviorEvent(user_id=USER, item_id=i, event_type=t, timestamp=last + timedelta(hours=5, minutes=m))
            for m, (i, t) in enumerate([("22386", "view"), (ITEM, "view"), (ITEM, "cart")])]
    return evs


@pytest.fixture
def rt(tmp_path: Path) -> FakeRuntime:
    r = FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64", permutations=1, n_candidates=6,
                             model_retries=0, model_cooldown_s=0))
    r.store.add_items(DS, [CatalogItem(item_id=i, title=t, price=2.5, category="home") for i, t in CATALOG.items()])
    r.store.add_events(DS, _events())  # raw, unmasked: as a loader stores it
    assert any(EMAIL in (e.review_text or "") for e in r.store.user_events(DS, USER))
    return r


def _prompts(calls: list[FakeCall]) -> list[str]:
    return ["\n".join(str(m["content"]) for m in c.messages) for c in calls]


def _check(name: str, calls: list[FakeCall], *, shows_reviews: bool) -> None:
    """The step made model calls, none of them holds a leak, and (where the prompt quotes the
    user's reviews) the review reached it masked."""
    prompts = _prompts(calls)
    assert prompts, f"{name}: no model call, so nothing was tested"
    for p in prompts:
        for leak in LEAKS:
            assert leak not in p, f"{name}: {leak!r} reached a prompt:\n{p}"
    if shows_reviews:
        assert any("[email]" in p and "[phone]" in p for p in prompts), f"{name}: the review never reached a prompt"


async def _step(rt: FakeRuntime, name: str, coro: Any, *, shows_reviews: bool = False) -> Any:
    n = len(rt.fake.calls)
    out = await coro
    _check(name, rt.fake.calls[n:], shows_reviews=shows_reviews)
    return out


async def test_no_task_puts_personal_data_from_reviews_into_a_prompt(rt: FakeRuntime) -> None:
    svc = ShopLensService(rt)
    cfg = svc.next_item_config(k=3)
    pred = await _step(rt, "next_item", svc.next_item(DS, USER, config=cfg), shows_reviews=True)
    assert not pred.meta.degraded, pred.meta
    inline = [e.model_copy(update={"user_id": "web-1"}) for e in rt.store.user_events(DS, USER)]
    await _step(rt, "next_item inline", svc.next_item(DS, "web-1", events=inline, config=cfg), shows_reviews=True)
    p = await _step(rt, "intent", svc.intent(DS, USER, ITEM), shows_reviews=True)
    assert p.reason_source == "model", p.meta
    p = await _step(rt, "session_intent", svc.session_intent(DS, USER))
    assert p.probability_source == "blend", p.meta
    p = await _step(rt, "churn", svc.churn(DS, USER), shows_reviews=True)
    assert p.reason_source == "model", p.meta
    p = await _step(rt, "profile", svc.profile(DS, USER, strict=True), shows_reviews=True)
    assert p.summary_source == "model", p.meta
    p = await _step(rt, "audience", svc.audience(DS, item_id=ITEM, n=3), shows_reviews=True)
    assert p.users[0].reason_source == "model", p.meta
    batch = await _step(rt, "sentiment", svc.sentiment([PII_TEXT, "Arrived broken."], aspects=True))
    assert batch.meta.by_model == 2, batch.meta


@pytest.mark.parametrize(("question", "shows_reviews"), [
    (f"What will customer {USER} buy next?", False),
    (f"Describe customer {USER}'s shopping style.", True),
    (f"How do people feel about item {ITEM}?", False),  # only negative reviews are quoted
    (f"Show the purchase history of customer {USER}", False),  # the answer quotes items, not reviews
])
async def test_the_chat_puts_no_personal_data_into_a_prompt(rt: FakeRuntime, question: str,
                                                            shows_reviews: bool) -> None:
    ctx = ToolContext(rt, ShopLensService(rt), DS, NextItemConfig(k=3, use_llm_ranking=False, explain=False))
    n = len(rt.fake.calls)
    events = [ev async for ev in ChatAgent(ctx).ask(question)]
    assert events[-1].kind == "done" and events[-1].answer_source == "model", events[-1]
    _check(question, rt.fake.calls[n:], shows_reviews=shows_reviews)


def test_the_api_puts_no_personal_data_into_a_prompt(rt: FakeRuntime) -> None:
    api = ApiSettings(api_keys="k", rate_limit_rps=0, readyz_cache_s=0)
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(rt, api)) as c:
        new = [{"user_id": "api-1", "item_id": ITEM, "event_type": "review", "rating": 5, "review_text": PII_TEXT,
                "timestamp": (T0 + timedelta(days=21)).isoformat()},
               {"user_id": "api-1", "item_id": "22423", "event_type": "purchase", "quantity": 1,
                "timestamp": (T0 + timedelta(days=21, hours=1)).isoformat()}]
        assert c.post("/v1/events", json={"dataset": DS, "events": new}, headers=auth).status_code == 200
        stored = c.get("/v1/users/api-1/events", params={"dataset": DS}, headers=auth).json()["events"]
        assert EMAIL not in json.dumps(stored) and "[email]" in json.dumps(stored)  # masked at ingest too
        inline = [dict(e, user_id="web-2") for e in new]
        for route, body in [
            ("/v1/next-item", {"dataset": DS, "user_id": USER, "k": 3}),
            ("/v1/next-item", {"dataset": DS, "user_id": "web-2", "k": 3, "events": inline}),
            ("/v1/purchase-intent", {"dataset": DS, "user_id": USER, "item_id": ITEM}),
            ("/v1/session-intent", {"dataset": DS, "user_id": USER}),
            ("/v1/churn", {"dataset": DS, "user_id": USER}),
            ("/v1/profile", {"dataset": DS, "user_id": USER}),
            ("/v1/audience", {"dataset": DS, "item_id": ITEM, "n": 3}),
            ("/v1/sentiment", {"texts": [PII_TEXT]}),
        ]:
            n = len(rt.fake.calls)
            r = c.post(route, json=body, headers=auth)
            assert r.status_code == 200, (route, r.text)
            assert not r.json()["meta"]["degraded"], (route, r.json()["meta"])
            _check(route, rt.fake.calls[n:], shows_reviews=route in ("/v1/churn", "/v1/profile"))
