"""The served churn blend (issue 16): no hand-set model weight. Without a fitted blend the answer is
the baseline's probability with the weight-0 note; a blend fitted on validation users serves only
when the model earned it; a fit whose labels reach the test period is refused; the eval's
comparison on hand-made scores gives hand-computed numbers. FakeModel only."""

from __future__ import annotations

import asyncio
import json
import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.data.store import EventStore
from agent.domain.schemas import CatalogItem
from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeCall, FakeModel
from agent.settings import Settings
from agent.tasks.binary_stats import compare_scorers
from agent.tasks.churn import ChurnService
from agent.tasks.churn_blend import ServedChurnBlend, check_validation_as_of, churn_cutoffs
from agent.tasks.stack import Stack, cross_fitted
from eval.churn_eval import churn_compare
from eval.runs import rescore
from tests.test_eval_store import T0 as SHOP_T0
from tests.test_eval_store import _ev
from tests.test_tasks import CATALOG, DS, T0, store, yes_reply  # noqa: F401 (store: a fixture)

# ---- the served answer ------------------------------------------------------------------------


async def test_no_fitted_blend_serves_the_baseline_and_says_the_model_has_weight_0(store: Any) -> None:  # noqa: F811
    evs = store.user_events(DS, "u1")
    model = FakeModel.with_replies([yes_reply(0.05), json.dumps(
        {"action": "win_back_offer", "reason": "No order for a long time", "evidence": ["E4"]})])
    p = await ChurnService(model).predict("u1", evs, CATALOG, as_of=T0 + timedelta(days=50), dataset=DS)
    assert p.probability == p.baseline_probability and p.probability_source == "baseline"
    assert p.model_probability == pytest.approx(0.95)  # the model's answer is still shown
    assert (f"the model has weight 0 in this blend: no churn blend fitted for {DS} at 90 days (fit one with "
            f"`shoplens train --dataset {DS} --task churn`)") in p.meta.notes


async def test_a_fitted_blend_that_earned_its_place_is_served(store: Any) -> None:  # noqa: F811
    evs = store.user_events(DS, "u1")
    st = Stack(["baseline", "llm"], {"baseline": 0.5, "llm": 1.0}, 0.1, "stack")
    served = ServedChurnBlend(st, "churn blend: stack (test)")
    model = FakeModel.with_replies([yes_reply(0.2)])
    p = await ChurnService(model, explain=False, blend=served).predict("u1", evs, CATALOG, as_of=T0 + timedelta(days=50))
    pb, pm = p.baseline_probability, 0.8
    want = 1 / (1 + math.exp(-(0.1 + 0.5 * math.log(pb / (1 - pb)) + math.log(pm / (1 - pm)))))
    assert p.probability_source == "blend" and p.probability == pytest.approx(want, abs=1e-6)
    assert "churn blend: stack (test)" in p.meta.notes
    # the model down: the baseline's probability, said so
    p = await ChurnService(None, explain=False, blend=served).predict("u1", evs, CATALOG, as_of=T0 + timedelta(days=50))
    assert p.probability == p.baseline_probability and p.probability_source == "baseline"
    assert "the model gave no probability: the baseline probability is served" in p.meta.notes


def test_stack_with_a_reference_keeps_it_unless_beaten_by_one_se() -> None:
    """A member that is noise never takes the reference's place; one that carries the signal does."""
    y = [i % 2 for i in range(200)]
    base = [0.4 + 0.2 * (v if i % 3 else 1 - v) for i, v in enumerate(y)]  # right on 2 of 3 cases
    noise = [0.3 + 0.4 * ((i * 37) % 11) / 10 for i in range(200)]
    st = Stack.fit(y, {"baseline": base, "llm": noise}, reference="baseline")
    assert st.chosen == "baseline" and set(st.coef) == {"baseline"}
    strong = [0.1 + 0.8 * v if i % 7 else 0.5 for i, v in enumerate(y)]
    st = Stack.fit(y, {"baseline": base, "llm": strong}, reference="baseline")
    assert st.chosen != "baseline" and st.reference_gain["mean"] > st.reference_gain["se"]
    with pytest.raises(ValueError, match="reference 'x' is not a member"):
        Stack.fit(y, {"baseline": base}, reference="x")
    out, chosen = cross_fitted(y, {"baseline": base, "llm": noise}, reference="baseline")
    assert chosen == ["baseline"] * 5 and out == base  # weight 0 in every fold: the baseline itself


# ---- the leak rule ----------------------------------------------------------------------------


def test_a_fit_whose_labels_reach_the_test_period_is_refused() -> None:
    val, test = churn_cutoffs(datetime(2011, 12, 9, tzinfo=UTC), "online-retail", 90)
    assert (val, test) == (datetime(2011, 6, 1, tzinfo=UTC), datetime(2011, 9, 1, tzinfo=UTC))
    check_validation_as_of(val, 90, test)  # 2011-06-01 + 90 d = 2011-08-30: allowed
    with pytest.raises(ValueError) as e:
        check_validation_as_of(datetime(2011, 8, 1, tzinfo=UTC), 90, test)
    assert str(e.value) == (
        "--as-of 2011-08-01: the validation labels (no purchase 2011-08-01 .. 2011-10-30, 90 days) reach the test "
        "period that starts 2011-09-01 (`shoplens eval churn`); fit the served churn blend at --as-of 2011-06-03 "
        "or earlier")
    end = datetime(2020, 3, 1, tzinfo=UTC)
    assert churn_cutoffs(end, "shop", 14) == (end - timedelta(days=28), end - timedelta(days=14))


# ---- the eval's comparison ----------------------------------------------------------------------


def test_compare_on_six_hand_made_cases() -> None:
    """y = 1 1 1 0 0 0. Baseline: 9 positive-negative pairs, 8 ranked right -> ROC AUC 8/9; the
    positives rank 1, 2, 4 -> AP (1/1 + 2/2 + 3/4) / 3 = 11/12. Model: 4 of 9 pairs right plus
    one tie (0.5) -> 4.5/9."""
    y = [1, 1, 1, 0, 0, 0]
    pb = [0.9, 0.8, 0.6, 0.7, 0.3, 0.2]
    pm = [0.6, 0.5, 0.2, 0.5, 0.7, 0.1]
    cmp = compare_scorers(y, {"baseline": pb, "model": pm}, reference="baseline", n_boot=200)
    assert cmp["baseline"]["roc_auc"] == round(8 / 9, 4) and cmp["baseline"]["pr_auc"] == round(11 / 12, 4)
    assert cmp["model"]["roc_auc"] == round(4.5 / 9, 4)
    assert cmp["model"]["roc_auc_diff"] == round(4.5 / 9 - 8 / 9, 4)
    lo, hi = cmp["model"]["roc_auc_diff_ci"]
    assert lo <= cmp["model"]["roc_auc_diff"] <= hi and "roc_auc_diff" not in cmp["baseline"]
    weight0 = ServedChurnBlend(None, "weight 0")
    full, scores, chosen = churn_compare(y, pb, pm, served=weight0, n_boot=200)
    assert set(full) == {"baseline", "model", "blend_crossfit", "blend_served"}
    assert scores["blend_served"] == pb and full["blend_served"]["roc_auc_diff"] == 0.0
    assert full["model"]["roc_auc"] == round(4.5 / 9, 4) and len(chosen) == 3


# ---- fit, save, serve, measure: the CLI end to end on a toy shop with a fake model ---------------


def _knowing_model(call: FakeCall) -> Completion:
    """P(another order): high for the loyal users s0..s29, low for the lapsing ones, every 5th
    user the other way (the RFM baseline cannot tell the groups apart at the validation cut-off:
    both bought every 5 days until day 25)."""
    if not call.top_logprobs:
        return Completion(text=json.dumps({"action": "loyalty_reward", "reason": "Orders regularly.",
                                           "evidence": ["E1"]}), usage=Usage(10, 5), model="fake")
    u = int(re.search(r"Customer s(\d+)", call.messages[-1]["content"]).group(1))  # type: ignore[union-attr]
    p = 0.8 if (u < 30) != (u % 5 == 0) else 0.2
    return Completion(text="yes", top_logprobs=[{"yes": math.log(p), "no": math.log(1 - p)}], usage=Usage(10, 1),
                      model="fake")


def _flat_model(call: FakeCall) -> Completion:
    return Completion(text="yes", top_logprobs=[{"yes": math.log(0.5), "no": math.log(0.5)}], usage=Usage(10, 1),
                      model="fake")


@pytest.fixture
def shop_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`tests.test_eval_store._shop` with each user's minute of the day shuffled, so the RFM
    baseline cannot rank the loyal users above the lapsing ones by it."""
    monkeypatch.setenv("SHOPLENS_EMBEDDER", "hashing-4096")
    ws = tmp_path / "ws"
    events = []
    for u in range(60):
        for day in range(0, 60, 5):
            minutes = day * 1440 + (u * 37) % 60
            events.append(_ev(f"s{u}", f"i{(u + day) % 7}", minutes, "view"))
            if u < 30 or day < 30:
                events.append(_ev(f"s{u}", f"i{(u + day) % 7}", minutes + 30))
    db = EventStore(ws / "shoplens.sqlite3")
    db.add_items("shop", [CatalogItem(item_id=f"i{j}", title=f"Toy item {j}") for j in range(7)])
    db.add_events("shop", events)
    db.close()
    return ws


def _train(ws: Path, monkeypatch: pytest.MonkeyPatch, responder: Any, *args: str) -> Any:
    from ui.cli import app

    async def connect(self: Runtime) -> FakeModel:
        return FakeModel(responder=responder)

    monkeypatch.setattr(Runtime, "connect_model", connect)
    return CliRunner().invoke(app, ["train", "--dataset", "shop", "--task", "churn", "--horizon-days", "14",
                                    "--cases", "60", "--workspace", str(ws), *args])


def test_train_churn_fits_saves_and_serves_a_blend_the_model_earned(shop_ws: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    r = _train(shop_ws, monkeypatch, _knowing_model)
    assert r.exit_code == 0, r.output
    assert "saved" in r.output and "model weight" in r.output
    fitted = json.loads((shop_ws / "indexes" / "shop" / "churn_blend-14d.json").read_text())
    assert fitted["stack"]["chosen"] != "baseline" and fitted["n_sampled"] == 60
    assert fitted["metrics"]["validation"]["blend_crossfit"]["roc_auc_diff"] > 0
    rt = Runtime(Settings(workspace=shop_ws))
    svc = ShopLensService(rt)
    p = asyncio.run(svc.churn("shop", "s3", horizon_days=14))
    assert p.probability_source == "blend" and p.probability != p.baseline_probability
    assert any(n.startswith("churn blend: ") for n in p.meta.notes)
    # the eval scores the served blend beside the cross-fitted one on the test users, then rescores
    from ui.cli import app

    r = CliRunner().invoke(app, ["eval", "churn", "--dataset", "shop", "--horizon-days", "14", "--cases", "40",
                                 "--explain", "0", "--workspace", str(shop_ws)])
    assert r.exit_code == 0, r.output
    run = Path(r.output.strip().splitlines()[-1])
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["sample"]) == {"baseline", "model", "blend_crossfit", "blend_served"}
    assert m["sample"]["baseline"]["n"] == 40 and "roc_auc_diff_ci" in m["sample"]["blend_served"]
    scores = [json.loads(x) for x in (run / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 40 and {"p_base", "p_model"} <= set(json.loads(
        (run / "cases.jsonl").read_text().splitlines()[0]))
    again = rescore(run)
    assert again["sample"] == m["sample"]


def test_train_churn_gives_a_useless_model_weight_0(shop_ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _train(shop_ws, monkeypatch, _flat_model)
    assert r.exit_code == 0, r.output
    assert "the baseline alone (the model has weight 0)" in r.output
    p = asyncio.run(ShopLensService(Runtime(Settings(workspace=shop_ws))).churn("shop", "s3", horizon_days=14))
    assert p.probability == p.baseline_probability and p.probability_source == "baseline"
    assert any(n.startswith("the model has weight 0 in this blend: the fit on validation users at ")
               for n in p.meta.notes)


def test_train_churn_refuses_labels_in_the_test_period(shop_ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shop's data ends on day ~55, so its test period starts on day ~41: labels from day 40 on reach it."""
    day40 = f"{SHOP_T0 + timedelta(days=40):%Y-%m-%d}"
    r = _train(shop_ws, monkeypatch, _flat_model, "--as-of", day40)
    assert r.exit_code == 2
    assert f"--as-of {day40}: the validation labels" in r.output and "reach the test period" in r.output
    assert "fit the served churn blend at --as-of" in r.output
    assert not (shop_ws / "indexes" / "shop" / "churn_blend-14d.json").exists()
