"""Session-level purchase intent: session splitting and features against hand-computed values,
the labelled rows' leakage guard, cold start, schema normalisation, the model path with fakes,
the CLI (no --item) and the eval on a tiny synthetic store. Fakes only."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from agent.app.runtime import Runtime
from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeCall, FakeModel, Reply
from agent.settings import Settings
from agent.tasks.common import Blend, LogisticBaseline
from agent.tasks.intent import IntentService
from agent.tasks.session_intent import (
    SESSION_FEATURES,
    SESSION_GAP,
    SessionIntentPrediction,
    SessionIntentService,
    cut_time,
    session_features,
    session_rows,
    split_sessions,
)

T0 = datetime(2017, 11, 25, tzinfo=UTC)
CATALOG = {i: CatalogItem(item_id=i, title=f"Taobao item {i} (category {c})", category=c)
           for i, c in {"A": "c1", "B": "c1", "C": "c2", "D": "c3"}.items()}


def ev(item: str, kind: str, minutes: float, user: str = "u") -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind, timestamp=T0 + timedelta(minutes=minutes))


def yes_reply(p_yes: float) -> Completion:
    return Completion(text="yes" if p_yes >= 0.5 else "no", usage=Usage(100, 1),
                      top_logprobs=[{"yes": math.log(p_yes), "no": math.log(1 - p_yes)}])


# Session 1: minutes 0..20, with a purchase. Session 2 starts at 100 (gap 80 min):
#   100 view A, 102 view B, 105 view A (re-view), 110 cart A, 111 cart C, 112 remove C, 125 fav D,
#   130 purchase B (at the cut in the tests below: the label, never a feature).
EVENTS = [ev("A", "view", 0), ev("A", "cart", 5), ev("A", "purchase", 20),
          ev("A", "view", 100), ev("B", "view", 102), ev("A", "view", 105), ev("A", "cart", 110),
          ev("C", "cart", 111), ev("C", "remove_from_cart", 112), ev("D", "favourite", 125),
          ev("B", "purchase", 130)]


# ---- splitting and features ------------------------------------------------------------------------


def test_sessions_split_at_a_30_minute_gap() -> None:
    assert timedelta(minutes=30) == SESSION_GAP
    evs = [ev("A", "view", m) for m in (0, 10, 39.9, 69.9, 100)]  # gaps 10, 29.9, 30, 30.1
    assert [[e.timestamp for e in s] for s in split_sessions(evs)] == [
        [evs[0].timestamp, evs[1].timestamp, evs[2].timestamp], [evs[3].timestamp], [evs[4].timestamp]]
    assert [len(s) for s in split_sessions(EVENTS)] == [3, 8]
    assert split_sessions([]) == []


def sev(minutes: float, session: str | None) -> BehaviorEvent:
    return BehaviorEvent(user_id="u", item_id="A", event_type="view", timestamp=T0 + timedelta(minutes=minutes),
                         session_id=session)


def test_session_ids_decide_where_events_carry_them() -> None:
    # s1 at 0 and 5; s2 at 6 (1 min later: the gap rule would merge it); s2 again at 100 (95 min
    # later: the gap rule would split it); then two events without an id, 40 min apart (gap rule).
    evs = [sev(0, "s1"), sev(5, "s1"), sev(6, "s2"), sev(100, "s2"), sev(101, None), sev(141, None)]
    assert [[int((e.timestamp - T0).total_seconds() // 60) for e in s] for s in split_sessions(evs)] == [
        [0, 5], [6, 100, 101], [141]]
    # features follow the ids: the current session s2 is 2 events over 94 min, one session before it
    f = session_features([sev(0, "s1"), sev(5, "s1"), sev(6, "s2"), sev(100, "s2")], T0 + timedelta(minutes=101))
    assert (f.n_events, f.past_sessions, f.length_min) == (2, 1, 94.0)


def test_session_features_hand_computed() -> None:
    as_of = T0 + timedelta(minutes=130)  # the purchase at 130 is not before as_of
    f = session_features(EVENTS, as_of, CATALOG)
    assert f.session_start == (T0 + timedelta(minutes=100)).isoformat()
    assert (f.n_events, f.n_views, f.n_carts, f.n_favs, f.n_removes, f.n_purchases) == (7, 3, 2, 1, 1, 0)
    assert (f.distinct_items, f.distinct_categories, f.re_views) == (4, 3, 1)  # A,B,C,D; c1,c2,c3; A again
    assert f.length_min == 25.0 and f.events_per_min == pytest.approx(7 / 25, abs=1e-4)
    assert f.cart_open  # A carted and still there; C carted then removed
    assert f.minutes_since_last_event == 5.0
    assert (f.past_sessions, f.past_sessions_with_purchase, f.user_purchases, f.user_buy_rate) == (1, 1, 1, 1.0)
    assert f.hours_since_last_purchase == pytest.approx(110 / 60, abs=1e-3)
    v = f.vector()
    assert list(v) == SESSION_FEATURES and v["cart_open"] == 1.0 and v["log_carts"] == pytest.approx(math.log(3))
    # removing the open cart's item by buying it closes the cart
    g = session_features(EVENTS[:7] + [ev("A", "purchase", 111)], T0 + timedelta(minutes=112), CATALOG)
    assert not g.cart_open and g.n_purchases == 1 and g.user_purchases == 2
    # a single-event session: length 0, pace floored at 1 minute
    h = session_features(EVENTS[:4], T0 + timedelta(minutes=101))
    assert (h.n_events, h.length_min, h.events_per_min, h.distinct_categories) == (1, 0.0, 1.0, 0)


# ---- labelled rows: no leakage ---------------------------------------------------------------------


def test_cut_rules() -> None:
    s2 = split_sessions(EVENTS)[1]
    assert cut_time(s2, "k3") == T0 + timedelta(minutes=105, seconds=1)
    assert cut_time(s2, "first-cart") == T0 + timedelta(minutes=110, seconds=1)
    assert cut_time(s2[:2], "k3") is None and cut_time(s2[:3], "first-cart") is None
    with pytest.raises(ValueError, match="k<N>"):
        cut_time(s2, "k0")


def test_rows_never_see_events_at_or_after_the_cut() -> None:
    rows = session_rows([("u", EVENTS)], "k3", catalog=CATALOG)
    assert [(r.session_start, r.label) for r in rows] == [(T0, 0), (T0 + timedelta(minutes=100), 1)]
    r = rows[1]
    assert r.cut == T0 + timedelta(minutes=105, seconds=1)
    # features equal those from the events strictly before the cut ...
    assert r.features == session_features([e for e in EVENTS if e.timestamp < r.cut], r.cut, CATALOG)
    assert (r.features.n_events, r.features.n_carts, r.features.n_purchases, r.features.user_purchases) == (3, 0, 0, 1)
    # ... and do not change when everything from the cut on is rewritten (more purchases, or nothing)
    before = [e for e in EVENTS if e.timestamp < r.cut]
    for after in ([], [ev("B", "purchase", 105 + 1 / 60), ev("C", "purchase", 106), ev("D", "cart", 107)]):
        again = session_rows([("u", before + after)], "k3", catalog=CATALOG)[1]
        assert again.features == r.features
        assert again.label == int(bool(after))  # a purchase exactly at the cut is label, not feature
    # a session that stops at the k-th event still qualifies (qualifying never depends on the future)
    assert session_rows([("u", before)], "k3")[1].label == 0


def test_label_windows_and_time_split() -> None:
    later = EVENTS[:6] + [ev("B", "purchase", 60 * 20)]  # session 2 ends at 105; a buy 20 h later
    assert [r.label for r in session_rows([("u", later)], "k3")] == [0, 0]  # not in the same session
    h24 = session_rows([("u", later)], "k3", horizon_hours=24)
    assert [r.label for r in h24] == [1, 1]  # within 24 h of either cut (session 1's own buy is at 20 min: k3 cut 20:01)
    assert h24[1].label_end == h24[1].cut + timedelta(hours=24)
    s_end = session_rows([("u", EVENTS)], "k3")[1].label_end
    assert s_end == T0 + timedelta(minutes=130) + SESSION_GAP  # known over only after the gap
    split = T0 + timedelta(minutes=60)
    assert [r.session_start for r in session_rows([("u", EVENTS)], "k3", end=split)] == [T0]
    assert [r.session_start for r in session_rows([("u", EVENTS)], "k3", start=split)] == [T0 + timedelta(minutes=100)]


# ---- the prediction ---------------------------------------------------------------------------------


async def test_cold_start_is_the_labelled_base_rate_and_calls_no_model() -> None:
    model = FakeModel()  # raises if called
    p = await SessionIntentService(model).predict("new", [], CATALOG, base_rate=0.07)
    assert p.cold_start and p.probability == 0.07 and p.probability_source == "cold_start_base_rate"
    assert p.reason_source == "cold_start" and p.reason.startswith("[cold start]") and p.model_probability is None
    assert model.calls == [] and p.evidence == []
    d = await SessionIntentService(None, LogisticBaseline(["log_events"], [0.0], 0.0, 0.11)).predict(
        "u", EVENTS, CATALOG, as_of=T0)  # every event is at/after as_of
    assert d.cold_start and d.probability == 0.11


def test_probability_normalised_or_rejected() -> None:
    body = dict(user_id="u", as_of="x", horizon="later in this session", probability="87%",
                probability_source="baseline", baseline_probability="0.5", session={}, reason="r",
                reason_source="fallback", meta={"task": "session_intent"})
    p = SessionIntentPrediction.model_validate(body)
    assert p.probability == 0.87 and p.baseline_probability == 0.5
    with pytest.raises(ValidationError, match="outside \\[0, 1\\]"):
        SessionIntentPrediction.model_validate(body | {"probability": 87})
    with pytest.raises(ValidationError, match="not a number"):
        SessionIntentPrediction.model_validate(body | {"probability": "likely"})
    with pytest.raises(ValidationError):
        SessionIntentPrediction.model_validate(body | {"probability_source": "guess"})


async def test_blend_and_cited_session_evidence() -> None:
    model = FakeModel.with_replies([yes_reply(0.8), json.dumps(
        {"stage": "Ready to Buy", "reason": "carted item A after viewing it twice", "evidence": ["e6", "E4"]})])
    base = LogisticBaseline(["log_carts", "cart_open"], [1.0, 0.5], -2.0, 0.1)
    as_of = T0 + timedelta(minutes=130)
    p = await SessionIntentService(model, base).predict("u", EVENTS, CATALOG, as_of=as_of, dataset="toy")
    pb = 1 / (1 + math.exp(-(math.log(3) + 0.5 - 2.0)))
    assert p.baseline_probability == pytest.approx(pb, abs=1e-5) and p.model_probability == pytest.approx(0.8)
    assert p.probability == pytest.approx(Blend()(pb, 0.8), abs=1e-5) and p.probability_source == "blend"
    assert p.stage == "ready_to_buy" and p.reason_source == "model" and p.horizon_hours is None
    assert [e.event_id for e in p.evidence] == [EVENTS[5].event_id, EVENTS[3].event_id]  # E6, E4: views of A
    assert p.meta.prompt_versions == ["session_intent.v1", "session_intent_explain.v1"] and p.meta.task == "session_intent"
    prompt = model.calls[0].messages[-1]["content"]
    assert "shown as E4-E10" in prompt and "(still in the cart)" in prompt and "bought Taobao item B" not in prompt
    assert model.calls[0].max_tokens == 1 and model.calls[0].top_logprobs > 0
    assert model.calls[1].schema is not None and "E10" in model.calls[1].schema["properties"]["evidence"]["items"]["enum"]


async def test_invalid_explanation_falls_back_to_a_template_reason() -> None:
    model = FakeModel.with_replies([yes_reply(0.3), '{"stage": "??"}', '{"stage": "browsing"}'])
    p = await SessionIntentService(model).predict("u", EVENTS, CATALOG, as_of=T0 + timedelta(minutes=130),
                                                  horizon_hours=24)
    assert p.reason_source == "fallback" and p.meta.degraded and p.reason.startswith("[template]")
    assert p.evidence[0].event_type == "cart" and p.horizon == "within the next 24 hours"
    assert p.probability_source == "blend"  # the verbalizer answered; only the explanation failed


# ---- CLI --------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    s = EventStore(tmp_path / "ws" / "shoplens.sqlite3")
    s.add_items("toy", CATALOG.values())
    s.add_events("toy", EVENTS)
    return s


def test_cli_intent_without_item_is_session_intent(store: EventStore) -> None:
    from ui.tasks_cli import register

    ws = store.path.parent
    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["intent", "--dataset", "toy", "--user", "u", "--workspace", str(ws), "--no-llm"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout[r.stdout.index("{"):])
    assert body["session"]["n_events"] == 8 and body["horizon_hours"] is None
    assert body["probability_source"] == "baseline" and body["reason"].startswith("[template]")
    # one finished session (the last is still open at the dataset's end): too few rows to fit a baseline
    assert any("hand-set prior" in n for n in body["meta"]["notes"])
    r = CliRunner().invoke(app, ["intent", "--dataset", "toy", "--user", "ghost", "--workspace", str(ws), "--no-llm"])
    body = json.loads(r.stdout[r.stdout.index("{"):])
    assert body["cold_start"] and body["probability_source"] == "cold_start_base_rate"
    IntentService(None).baseline.save(ws / "tasks" / "intent-48h-toy.json")
    r = CliRunner().invoke(app, ["intent", "--dataset", "toy", "--user", "u", "--item", "A", "--workspace", str(ws),
                                 "--no-llm"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout[r.stdout.index("{"):])
    assert body["item_id"] == "A" and body["horizon_hours"] == 48.0 and "funnel" in body  # per item, as before


# ---- eval on a tiny synthetic store ----------------------------------------------------------------


def _synthetic(n_users: int = 30, days: int = 6, seed: int = 0) -> list[BehaviorEvent]:
    """Sessions of 3-8 views; a cart in the first 3 events makes a later purchase likely."""
    rng = random.Random(seed)
    out = []
    for u in range(n_users):
        for d in range(days):
            t = d * 24 * 60 + rng.randint(0, 600)
            carted = rng.random() < 0.3
            for k in range(rng.randint(3, 8)):
                kind = "cart" if carted and k == 1 else "view"
                out.append(ev(rng.choice("ABCD"), kind, t + 2 * k, user=f"s{u}"))
            if rng.random() < (0.6 if carted else 0.1):
                out.append(ev("A", "purchase", t + 20, user=f"s{u}"))
    return out


def test_session_eval_on_a_tiny_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eval.session_intent_eval import run_session_intent_eval

    settings = Settings(workspace=tmp_path / "ws")
    st = EventStore(settings.db_path)
    st.add_items("toy", CATALOG.values())
    st.add_events("toy", _synthetic())

    def respond(call: FakeCall) -> Reply:
        if call.top_logprobs:
            return yes_reply(0.7 if "(still in the cart)" in call.messages[-1]["content"] else 0.2)
        return json.dumps({"stage": "considering", "reason": "viewed several items", "evidence": ["E1"]})

    fake = FakeModel(responder=respond)

    async def model(self: Runtime) -> FakeModel:
        return fake

    monkeypatch.setattr(Runtime, "model", model)
    split = T0 + timedelta(days=4)
    d = run_session_intent_eval(settings, dataset="toy", split=split, n_model=12, n_explain=2,
                                out=tmp_path / "run")
    m = json.loads((d / "metrics.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["n_train"] > 50 and cfg["n_test"] > 20 and cfg["cut_rule"] == "k3"
    assert m["baseline_all"]["n"] == cfg["n_test"] and m["baseline_all"]["roc_auc"] > 0.6
    assert m["trivial: base rate"]["roc_auc"] == 0.5
    assert m["trivial: has a cart in session"]["n"] == cfg["n_test"]
    assert m["sample_model_verbalizer"]["n"] == 12 and m["model"]["errors"] == 0
    cases = [json.loads(x) for x in (d / "cases.jsonl").read_text().splitlines()]
    assert len({c["case_id"] for c in cases}) == 12  # one case per session, not per user
    assert (d / "calibration.png").exists() and "trivial: has a cart in session" in (d / "report.md").read_text()


def test_features_are_plain_numbers_for_the_prompt() -> None:
    f = session_features(EVENTS, T0 + timedelta(minutes=130), CATALOG)
    assert json.loads(json.dumps(asdict(f)))["n_events"] == 7


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "inf", "5000"])
def test_cli_refuses_a_horizon_outside_the_api_bounds(bad: str) -> None:
    from ui.cli import app

    r = CliRunner().invoke(app, ["intent", "--dataset", "taobao", "--user", "1", "--horizon-hours", bad])
    assert r.exit_code == 2
    assert "is not a horizon; give hours in (0, 2160], e.g. 48" in r.output


def test_eval_session_bad_cut_is_a_clean_error(tmp_path: Path) -> None:
    from ui.cli import app

    r = CliRunner().invoke(app, ["eval", "intent", "--session", "--no-model", "--cut", "bogus",
                                 "--workspace", str(tmp_path), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "error: cut rule 'bogus'" in r.output
