"""The fine-tuned BERT encoder (issue 19): case building, user splits, fine-tuning, the manifest,
the blend, and serving through `ShopLensService.intent(scorer=...)`.

Fine-tuning runs the real packaged MiniLM for a few steps (module-scoped, ~20 s on 2 cores)."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.data.store import EventStore
from agent.domain.errors import ArtifactMismatchError, RequestError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.tasks.encoder import EncoderClassifier, FineTuneConfig, Platt, fine_tune, log_loss
from agent.tasks.encoder_cases import (
    TEMPLATE,
    build_cases,
    subsample,
    untouched_view_rate,
    user_fold,
    user_split,
)
from agent.tasks.encoder_train import (
    EncoderScorer,
    TrainedEncoder,
    encoder_dir,
    fit_case_baseline,
    load_trained,
    save_trained,
)
from agent.tasks.rows import intent_rows
from agent.tasks.stack import Stack

C = datetime(2017, 11, 28, tzinfo=UTC)  # the cut-off
DS = "toy"
CATALOG = {i: CatalogItem(item_id=i, title=f"{name} {i}", category=cat) for i, name, cat in [
    ("P1", "red mug", "x"), ("P2", "blue mug", "x"), ("Q1", "candle", "y"), ("Q2", "lamp", "y"),
    ("R1", "wooden sign", "z"), ("R2", "metal sign", "z")]}


def e(user: str, item: str, kind: str, hours: float) -> BehaviorEvent:
    """An event `hours` after the cut-off (negative: before it)."""
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind, timestamp=C + timedelta(hours=hours))


# Hand-checked, horizon 24 h, look-back 72 h:
# u1 views and carts P1, views Q1; after the cut buys P1 (+2 h) and first views R1 (+3 h).
# u2 views Q1 and Q2; after the cut views Q2 again (+1 h).
# u3 views R2 and P2; buys P2 only at +30 h, outside the horizon.
EVENTS = [e("u1", "P1", "view", -48), e("u1", "P1", "cart", -24), e("u1", "Q1", "view", -12),
          e("u1", "P1", "purchase", 2), e("u1", "R1", "view", 3),
          e("u2", "Q1", "view", -60), e("u2", "Q2", "view", -20), e("u2", "Q2", "view", 1),
          e("u3", "R2", "view", -40), e("u3", "P2", "view", -2), e("u3", "P2", "purchase", 30)]


@pytest.fixture
def store(tmp_path: Path) -> EventStore:
    s = EventStore(tmp_path / "ws" / "shoplens.sqlite3")
    s.add_items(DS, CATALOG.values())
    s.add_events(DS, EVENTS)
    return s


def labels(cases: list) -> dict[tuple[str, str], int]:
    return {(c.user_id, c.item_id): c.label for c in cases}


def test_purchase_cases_have_the_hand_checked_labels_and_equal_eval_intents_pairs(store: EventStore) -> None:
    cases = build_cases(store, DS, "purchase", [C], 24, CATALOG)
    assert labels(cases) == {("u1", "P1"): 1, ("u1", "Q1"): 0, ("u2", "Q1"): 0, ("u2", "Q2"): 0,
                             ("u3", "R2"): 0, ("u3", "P2"): 0}
    rows = intent_rows(store, DS, C, 24, dict(CATALOG))
    assert [(r.user_id, r.item_id, r.label) for r in rows] == [(c.user_id, c.item_id, c.label) for c in cases]
    assert {c.source for c in cases} == {"touched"}
    u1p1 = next(c for c in cases if (c.user_id, c.item_id) == ("u1", "P1"))
    # the text shows the funnel (1 view, 1 cart), the recency and the same-item events, nothing after the cut
    assert "here: 1 views 1 carts 0 favs 0 buys, last 24.0 h ago" in u1p1.text
    assert "cart same item 24.0 h" in u1p1.text and "purchase" not in u1p1.text


def test_click_cases_label_revisits_and_sample_negatives_the_user_never_touched(store: EventStore) -> None:
    cases = build_cases(store, DS, "click", [C], 24, CATALOG, seed=3)
    touched = {k: v for k, v in labels([c for c in cases if c.source == "touched"]).items()}
    # a purchase is not a click: u1's P1 is 0; u2 viewed Q2 again: 1
    assert touched == {("u1", "P1"): 0, ("u1", "Q1"): 0, ("u2", "Q1"): 0, ("u2", "Q2"): 1,
                       ("u3", "R2"): 0, ("u3", "P2"): 0}
    new = [c for c in cases if c.source != "touched"]
    assert [(c.user_id, c.item_id, c.label) for c in new if c.source == "new"] == [("u1", "R1", 1)]
    negs = [c for c in new if c.label == 0]
    assert {c.source for c in negs} <= {"same_category", "popularity"} and len(negs) == 2
    acted = {ev.item_id for ev in EVENTS if ev.user_id == "u1"}
    assert all(c.user_id == "u1" and c.item_id not in acted for c in negs)
    # R2 is the only other "z" item seen before the cut, so it is the same-category negative
    assert [c.item_id for c in negs if c.source == "same_category"] == ["R2"]


def test_no_user_is_in_two_splits_or_two_folds() -> None:
    users = [f"user{i}" for i in range(2000)]
    splits = {u: user_split(u, seed=0) for u in users}
    assert {u: user_split(u, seed=0) for u in users} == splits  # deterministic
    share = {s: sum(v == s for v in splits.values()) / len(users) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.04 and abs(share["val"] - 0.15) < 0.03
    assert {user_fold(u, 2) for u in users} == {0, 1}
    assert sum(user_split(u, seed=1) != splits[u] for u in users) > 500  # the seed changes the split


def test_subsample_keeps_every_positive_and_weights_negatives_back(store: EventStore) -> None:
    cases = build_cases(store, DS, "purchase", [C], 24, CATALOG) * 50
    kept, w = subsample(cases, neg_per_pos=2, seed=0)
    assert sum(c.label for c in kept) == 50
    negs = [x for c, x in zip(kept, w, strict=True) if c.label == 0]
    assert len(set(negs)) == 1 and negs[0] == pytest.approx(250 / 100)  # 250 negatives, ~100 asked
    assert abs(sum(negs) - 250) < 60  # the weights restore the natural count


def test_platt_and_weighted_log_loss_by_hand() -> None:
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
    assert log_loss([1, 0], [0.9, 0.2], weights=[1, 3]) == pytest.approx((-np.log(0.9) - 3 * np.log(0.8)) / 4)
    p = Platt(2.0, -1.0)(np.array([0.5]))
    assert p[0] == pytest.approx(0.5)


def test_stack_is_never_below_its_best_member_when_one_scorer_is_noise() -> None:
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, dict[str, list[float]]]:
        y = (rng.random(n) < 0.2).astype(int)
        good = 1 / (1 + np.exp(-(2.0 * y - 1.5 + rng.normal(0, 1.0, n))))
        return y, {"good": good.tolist(), "noise": rng.random(n).tolist()}

    y, m = draw(1500)
    st = Stack.fit(y.tolist(), m)
    assert st.cv_log_loss[st.chosen] <= min(st.cv_log_loss["good"], st.cv_log_loss["noise"])
    assert abs(st.coef.get("noise", 0.0)) < 0.2  # noise gets (almost) no weight
    yt, mt = draw(4000)
    from sklearn.metrics import roc_auc_score

    blend = [st.predict({"good": a, "noise": b}) for a, b in zip(mt["good"], mt["noise"], strict=True)]
    assert roc_auc_score(yt, blend) >= roc_auc_score(yt, mt["good"]) - 0.005
    assert log_loss(yt.tolist(), blend) <= log_loss(yt.tolist(), Platt.fit(np.log(np.array(mt["good"]) / (1 - np.array(mt["good"]))), yt.tolist())(np.log(np.array(mt["good"]) / (1 - np.array(mt["good"]))))) + 0.01


def test_stack_needs_a_gain_beyond_one_standard_error() -> None:
    """Two independent signals: the stack's gain is many SEs, it is kept. A member and a noisy copy
    of it: whatever the stack gains is within 1 SE, so the better single member serves."""
    rng = np.random.default_rng(1)
    n = 3000
    y = (rng.random(n) < 0.2).astype(int)

    def signal(noise: np.ndarray) -> list[float]:
        return (1 / (1 + np.exp(-(1.5 * y - 1.0 + noise)))).tolist()

    two = Stack.fit(y.tolist(), {"a": signal(rng.normal(0, 1, n)), "b": signal(rng.normal(0, 1, n))})
    assert two.chosen == "stack" and two.stack_gain["mean"] > 3 * two.stack_gain["se"] > 0
    base = rng.normal(0, 1, n)
    copy = Stack.fit(y.tolist(), {"a": signal(base), "a2": signal(base + rng.normal(0, 0.05, n))})
    assert copy.chosen in ("a", "a2") and copy.stack_gain["mean"] <= copy.stack_gain["se"]
    assert "within 1 SE, not used" in copy.describe() and "kept" in two.describe()
    assert set(copy.coef) == {copy.chosen}


def test_stack_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        Stack.fit([0, 0, 0], {"a": [0.1, 0.2, 0.3]})


# ---- real fine-tuning (the packaged MiniLM, a few steps) ----------------------------------------

POS = ["cart same item 1 h, bought again", "carted twice and favourited, last 1 h ago", "in cart now, viewed 5 times"]
NEG = ["viewed once 9 d ago, never again", "one view long ago, no cart", "seen once last month, nothing since"]


def _texts(seed: int, n: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    ys = [i % 2 for i in range(n)]
    return [rng.choice(POS if y else NEG) + f" #{rng.randint(0, 99)}" for y in ys], ys


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[EncoderClassifier, object, Path]:
    cfg = FineTuneConfig(batch_size=8, lr=1e-4, max_steps=12, eval_every=4, patience=5, max_len=32, seed=0)
    clf, hist = fine_tune(_texts(0, 48), _texts(1, 24), cfg, work_dir=tmp_path_factory.mktemp("ft"))
    return clf, hist, tmp_path_factory.mktemp("saved")


@pytest.mark.slow
def test_a_few_fine_tuning_steps_lower_validation_loss(tuned: tuple) -> None:
    clf, hist, _ = tuned
    raw = [c["val_raw_log_loss"] for c in hist.checks]
    assert hist.checks[0]["step"] == 0 and len(raw) == 4  # steps 0, 4, 8, 12
    assert min(raw[1:]) < raw[0] - 0.05, raw
    x, y = _texts(2, 40)
    p = clf.predict_proba(x)
    assert float(np.mean(p[np.array(y) == 1])) > float(np.mean(p[np.array(y) == 0]))


@pytest.mark.slow
def test_the_manifest_refuses_another_dataset_template_or_an_edited_file(tuned: tuple, store: EventStore) -> None:
    clf, hist, folder = tuned
    cases = build_cases(store, DS, "purchase", [C], 24, CATALOG)
    fitted = TrainedEncoder(clf, fit_case_baseline(cases, "toy"), Stack(["baseline", "bert"], {"bert": 1.0}, 0.0, "bert"))
    out = save_trained(fitted, folder / "encoder-purchase", {"dataset": DS, "task": "purchase", "template": TEMPLATE,
                                                            "horizon_h": 24.0})
    fix = "retrain"
    back = load_trained(out, DS, "purchase", fix)
    x, _ = _texts(3, 10)
    assert np.allclose(back.clf.predict_proba(x), clf.predict_proba(x), atol=1e-5)  # round trip
    with pytest.raises(ArtifactMismatchError, match="trained for dataset 'toy', not 'taobao'; retrain"):
        load_trained(out, "taobao", "purchase", fix)
    with pytest.raises(ArtifactMismatchError, match="trained for task 'purchase', not 'click'"):
        load_trained(out, DS, "click", fix)
    old = save_trained(fitted, folder / "old-template", {"dataset": DS, "task": "purchase",
                                                         "template": "encoder_case.v0", "horizon_h": 24.0})
    with pytest.raises(ArtifactMismatchError, match="trained for template 'encoder_case.v0', not 'encoder_case.v1'"):
        load_trained(old, DS, "purchase", fix)
    man = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(man | {"horizon_h": 48.0}))  # an edit of the manifest itself
    with pytest.raises(ArtifactMismatchError, match="does not match its sha256 \\(edited after training\\); retrain"):
        load_trained(out, DS, "purchase", fix)
    (out / "manifest.json").write_text("{oops")
    with pytest.raises(ArtifactMismatchError, match="manifest.json: unreadable"):
        load_trained(out, DS, "purchase", fix)
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "calibration.json").write_text(json.dumps({"a": 9.0, "b": 0.0, "max_len": 32}))
    with pytest.raises(ArtifactMismatchError, match=r"files differ from the manifest's sha256 \(calibration.json\)"):
        load_trained(out, DS, "purchase", fix)
    with pytest.raises(FileNotFoundError, match="no trained encoder"):
        load_trained(folder / "nothing", DS, "purchase", fix)


@pytest.mark.slow
def test_service_serves_the_trained_encoder_and_names_the_field_when_untrained(tuned: tuple, tmp_path: Path) -> None:
    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService
    from agent.settings import Settings

    rt = Runtime(Settings(workspace=tmp_path / "ws2", embedder="hashing-64"))
    rt.store.add_items(DS, CATALOG.values())
    rt.store.add_events(DS, EVENTS)
    svc = ShopLensService(rt, use_model=False)
    as_of = C.isoformat()
    with pytest.raises(RequestError, match="shoplens train --dataset toy --task purchase --model bert") as ei:
        asyncio.run(svc.intent(DS, "u1", "P1", as_of=as_of, horizon_hours=24, scorer="bert"))
    assert ei.value.param == "scorer"
    clf, _, _ = tuned
    cases = build_cases(rt.store, DS, "purchase", [C], 24, CATALOG)
    fitted = TrainedEncoder(clf, fit_case_baseline(cases, "toy"),
                            Stack(["baseline", "bert"], {"baseline": 0.5, "bert": 0.5}, -0.1, "stack"))
    save_trained(fitted, encoder_dir(rt.settings.index_dir(DS), "purchase"),
                 {"dataset": DS, "task": "purchase", "template": TEMPLATE, "horizon_h": 24.0})
    svc.state.encoders.clear()
    pred = asyncio.run(svc.intent(DS, "u1", "P1", as_of=as_of, horizon_hours=24, scorer="bert"))
    direct = EncoderScorer.load(rt.settings.index_dir(DS), DS, "purchase").predict(
        rt.store.user_events(DS, "u1"), "P1", C, CATALOG)
    assert pred.probability_source == "bert" and pred.scorer == "bert"
    assert pred.probability == pytest.approx(direct, abs=1e-6) == pytest.approx(pred.encoder_probability, abs=1e-6)
    blend = asyncio.run(svc.intent(DS, "u1", "P1", as_of=as_of, horizon_hours=24, scorer="blend"))
    want = fitted.stack.predict({"baseline": fitted.baseline.predict(cases[0].funnel.vector()), "bert": direct})
    assert blend.probability_source == "stack" and blend.probability == pytest.approx(want, abs=1e-5)
    assert any("the model has weight 0" in n for n in blend.meta.notes)
    with pytest.raises(RequestError, match="trained for 24 h") as ei:
        asyncio.run(svc.intent(DS, "u1", "P1", as_of=as_of, horizon_hours=48, scorer="bert"))
    assert ei.value.param == "horizon_hours"
    base = asyncio.run(svc.intent(DS, "u1", "P1", as_of=as_of, horizon_hours=24, scorer="baseline"))
    assert base.probability_source == "baseline" and base.probability == base.baseline_probability
    asyncio.run(rt.aclose())


def test_cli_names_the_flag_on_bad_scorer_or_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ui.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["eval", "intent", "--scorers", "baseline,gpt5", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "--scorers: unknown gpt5; choose from baseline, bert, llm, blend" in r.output
    r = runner.invoke(app, ["train", "--dataset", "toy", "--task", "purchase", "--model", "fusion",
                            "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "--task purchase trains a BERT encoder: use --model bert" in r.output
    r = runner.invoke(app, ["train", "--dataset", "toy", "--model", "bert", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "add --task click or --task purchase" in r.output
    r = runner.invoke(app, ["train", "--dataset", "nope", "--task", "click", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "--dataset nope: no such dataset" in r.output
    r = runner.invoke(app, ["train", "--dataset", "toy", "--horizon-hours", "24", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "apply to --task click|purchase; add --task" in r.output  # not a silent fusion fit
    r = runner.invoke(app, ["train", "--dataset", "toy", "--task", "purchase", "--users", "50", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "--users and --llm-windows apply to next-item fusion" in r.output
    for curve, msg in (("abc", "--curve abc: give training-set sizes as a comma list"),
                       ("0,-5", "--curve 0,-5: every size must be at least 10")):
        r = runner.invoke(app, ["eval", "intent", "--scorers", "bert", "--curve", curve, "--workspace", str(tmp_path)])
        assert r.exit_code == 2 and msg in r.output, r.output
    r = runner.invoke(app, ["eval", "intent", "--scorers", "llm", "--no-model", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "nothing left to score; drop --no-model" in r.output
    r = runner.invoke(app, ["eval", "intent", "--scorers", "bert", "--workspace", str(tmp_path)])
    assert r.exit_code == 2 and "--dataset taobao: no such dataset" in r.output
    assert not (tmp_path / "runs").exists()  # a refused run leaves no folder behind


def test_scorers_run_rescores_from_its_per_case_file_with_hand_computed_aucs(tmp_path: Path) -> None:
    from eval.runs import rescore

    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"kind": "intent_scorers", "seed": 0, "dataset": "toy", "task": "purchase",
                                               "horizon_hours": 48, "test_cutoff": "t", "train_cutoffs": [],
                                               "folds": 2, "git_commit": "x"}))
    rows = [(1, 0.9, 0.8), (0, 0.1, 0.2), (1, 0.4, 0.7), (0, 0.5, 0.3)]
    (d / "scores.jsonl").write_text("".join(json.dumps(
        {"case_id": f"u{i}|i", "label": y, "in_main": True, "in_llm_sample": False, "baseline": b,
         "baseline_1cut": b, "bert": e, "blend": e}) + "\n" for i, (y, b, e) in enumerate(rows)))
    m = rescore(d)["all"]["scorers"]
    assert m["baseline"]["roc_auc"] == 0.75 and m["bert"]["roc_auc"] == 1.0  # 3 of 4 pairs; 4 of 4
    assert m["bert"]["roc_auc_diff"] == 0.25 and m["baseline"]["n"] == 4
    assert "| bert | 4 (2) | 1.0000" in (d / "report.md").read_text()


def test_by_fold_shows_a_per_fold_recalibration_that_keeps_each_folds_ranking() -> None:
    """A blend that is the baseline through a different monotone map in each fold ties it within
    both folds, while the pooled AUC drops (the artifact `by_fold` exists to show)."""
    from sklearn.metrics import roc_auc_score

    from eval.encoder_eval import by_fold

    rows = [{"fold": 0, "label": 1, "baseline": 0.30}, {"fold": 0, "label": 0, "baseline": 0.20},
            {"fold": 1, "label": 1, "baseline": 0.25}, {"fold": 1, "label": 0, "baseline": 0.05}]
    for r in rows:  # fold 1's recalibration lifts its probabilities above fold 0's
        r["blend"] = r["baseline"] if r["fold"] == 0 else r["baseline"] + 0.5
    got = by_fold(rows, ["baseline", "blend"])
    assert got == {"fold0": {"n": 2, "positives": 1, "baseline": 1.0, "blend": 1.0},
                   "fold1": {"n": 2, "positives": 1, "baseline": 1.0, "blend": 1.0}}
    y = [r["label"] for r in rows]
    assert roc_auc_score(y, [r["baseline"] for r in rows]) == 1.0  # pooled: 4 of 4 pairs
    assert roc_auc_score(y, [r["blend"] for r in rows]) == 0.75  # fold 1's negative now outranks fold 0's buyer


def _save_click(tuned: tuple, rt: object, cutoffs: list[datetime] | None = None,
                extra: dict | None = None) -> TrainedEncoder:
    """The module's few-step encoder saved as the dataset's click encoder (baseline fitted on the
    toy click cases, a fixed blend)."""
    clf, _, _ = tuned
    cases = build_cases(rt.store, DS, "click", [C], 24, CATALOG)  # type: ignore[attr-defined]
    fitted = TrainedEncoder(clf, fit_case_baseline(cases, "toy click"),
                            Stack(["baseline", "bert"], {"baseline": 0.5, "bert": 0.5}, -0.1, "stack"))
    save_trained(fitted, encoder_dir(rt.settings.index_dir(DS), "click"),  # type: ignore[attr-defined]
                 {"dataset": DS, "task": "click", "template": TEMPLATE, "horizon_h": 24.0,
                  "cutoffs": [c.isoformat() for c in (cutoffs or [C])], "data_sha256": "toy"} | (extra or {}))
    return fitted


@pytest.mark.slow
def test_click_is_served_by_the_click_encoder_with_each_scorer(tuned: tuple, tmp_path: Path) -> None:
    """`ShopLensService.click`: untrained -> 422 on `dataset` naming the train command; trained ->
    the three scorers equal the saved folder's own predictions; another horizon -> 422 on
    `horizon_hours`; an unknown user -> the labelled base rate."""
    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService
    from agent.settings import Settings

    rt = Runtime(Settings(workspace=tmp_path / "ws3", embedder="hashing-64"))
    rt.store.add_items(DS, CATALOG.values())
    rt.store.add_events(DS, EVENTS)
    svc = ShopLensService(rt, use_model=False)
    with pytest.raises(RequestError, match="shoplens train --dataset toy --task click --model bert") as ei:
        asyncio.run(svc.click(DS, "u2", "Q2", as_of=C.isoformat()))
    assert ei.value.param == "dataset"
    fitted = _save_click(tuned, rt)
    direct = EncoderScorer.load(rt.settings.index_dir(DS), DS, "click").predict_many(
        [(rt.store.user_events(DS, "u2"), "Q2", C)], CATALOG)
    for scorer, source in (("blend", "stack"), ("bert", "bert"), ("baseline", "baseline")):
        p = asyncio.run(svc.click(DS, "u2", "Q2", as_of=C.isoformat(), scorer=scorer))  # type: ignore[arg-type]
        assert p.probability_source == source and p.scorer == scorer and p.horizon_hours == 24.0
        assert p.probability == pytest.approx(float(direct[scorer][0]), abs=1e-6)
    assert p.encoder_probability == pytest.approx(float(direct["bert"][0]), abs=1e-6)
    assert p.funnel["n_views"] == 1 and p.reason.startswith("[template] 1 views, 0 carts")
    want = fitted.stack.predict({"baseline": float(direct["baseline"][0]), "bert": float(direct["bert"][0])})
    assert float(direct["blend"][0]) == pytest.approx(want, abs=1e-9)
    with pytest.raises(RequestError, match="trained for 24 h") as ei:
        asyncio.run(svc.click(DS, "u2", "Q2", as_of=C.isoformat(), horizon_hours=48))
    assert ei.value.param == "horizon_hours"
    cold = asyncio.run(svc.click(DS, "nobody", "Q2", as_of=C.isoformat()))
    assert cold.cold_start and cold.probability_source == "cold_start_base_rate"
    assert cold.probability == pytest.approx(fitted.baseline.base_rate)
    assert any("'nobody' is not in 'toy'" in n for n in cold.meta.notes)
    ghost = asyncio.run(svc.click(DS, "u2", "NO-SUCH-ITEM", as_of=C.isoformat()))
    assert ghost.cold_start and ghost.reason.startswith("[cold start] unknown item 'NO-SUCH-ITEM'")
    # an item u2 never touched: without a recorded rate, the scorers' P with a note; with one, the rate
    old = asyncio.run(svc.click(DS, "u2", "R1", as_of=C.isoformat()))
    assert not old.touched_recently and old.probability_source == "stack"
    assert any("overstates the chance; retrain" in n for n in old.meta.notes)
    stats: dict[str, int] = {}
    build_cases(rt.store, DS, "click", [C], 24, CATALOG, stats=stats)
    assert stats == {"user_cutoffs": 3, "new_first_views": 1, "catalogue_items": 6}  # u1 first views R1 at +3 h
    _save_click(tuned, rt, extra={"untouched_view_rate": untouched_view_rate(stats)})
    svc.state.encoders.clear()
    new = asyncio.run(svc.click(DS, "u2", "R1", as_of=C.isoformat()))
    assert new.probability_source == "untouched_base_rate" and new.probability == pytest.approx(1 / 18, abs=1e-8)
    assert new.encoder_probability == old.encoder_probability and not new.touched_recently
    assert asyncio.run(svc.click(DS, "u2", "Q2", as_of=C.isoformat())).touched_recently  # viewed 20 h before
    late = asyncio.run(svc.click(DS, "u2", "Q2", as_of="2019-01-01"))
    assert any("days after the last label the encoder learnt from (2017-11-29)" in n for n in late.meta.notes)
    asyncio.run(rt.aclose())


def test_fuse_sources_by_hand() -> None:
    """Each source max-scaled, weighted, divided by the weights' sum; ties by user id."""
    from agent.tasks.audience import fuse_sources

    raw = {"repeat": {"a": 2.0, "b": 1.0}, "predicted": {"b": 0.8, "c": 0.4, "d": 0.4}}
    got = fuse_sources(raw, {"repeat": 1.0, "predicted": 3.0}, n=3)
    # a: 1*1/4 = 0.25; b: (1*0.5 + 3*1)/4 = 0.875; c, d: 3*0.5/4 = 0.375 (tie: c first)
    assert [(u, s) for u, s, _ in got] == [("b", 0.875), ("c", 0.375), ("d", 0.375)]
    assert got[0][2] == {"repeat": 0.5, "predicted": 1.0}
    assert [u for u, _, _ in fuse_sources(raw, {"repeat": 1.0}, n=5)] == ["a", "b"]  # weight 0: not a source


@pytest.mark.slow
def test_predicted_source_and_the_audience_eval_refuses_an_encoder_that_saw_its_days(
        tuned: tuple, tmp_path: Path) -> None:
    """The predicted source is the encoder's blend P per pool user; the eval's loader refuses an
    encoder whose labels reach the first tuned/held-out day and names `--until`."""
    from agent.app.runtime import Runtime
    from agent.settings import Settings
    from agent.tasks.audience import predicted_source
    from eval.audience_eval import load_eval_encoder

    rt = Runtime(Settings(workspace=tmp_path / "ws4", embedder="hashing-64"))
    rt.store.add_items(DS, CATALOG.values())
    rt.store.add_events(DS, EVENTS)
    _save_click(tuned, rt, cutoffs=[C - timedelta(hours=24)])  # labels end at C
    scorer = load_eval_encoder(rt.settings, DS, "click", C)  # exactly up to the first unseen hour: allowed
    evs = {u: rt.store.user_events(DS, u) for u in ("u1", "u2", "u3")}
    got = predicted_source(scorer, "Q2", ["u2", "u1"], lambda u: evs[u], C, CATALOG)
    direct = scorer.predict_many([(evs["u2"], "Q2", C), (evs["u1"], "Q2", C)], CATALOG)["blend"]
    assert list(got) == ["u2", "u1"] and list(got.values()) == pytest.approx(direct.tolist())
    with pytest.raises(ValueError, match=r"learnt from labels up to 2017-11-28T00:00:00\+00:00, after .*"
                                         r"--until 2017-11-27T23:00:00Z"):
        load_eval_encoder(rt.settings, DS, "click", C - timedelta(hours=1))
    with pytest.raises(ValueError, match="--encoder purchase: .*no trained encoder.*--task purchase --model bert"):
        load_eval_encoder(rt.settings, DS, "purchase", C)


def test_cli_click_and_train_flags_name_the_fix(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ui.cli import app

    runner = CliRunner()
    ws = ["--workspace", str(tmp_path)]
    r = runner.invoke(app, ["train", "--dataset", "toy", "--neg-per-pos", "4", *ws])
    assert r.exit_code == 2 and "--neg-per-pos and --until apply to --task click|purchase" in r.output
    r = runner.invoke(app, ["train", "--dataset", "toy", "--task", "click", "--until", "next tuesday", *ws])
    assert r.exit_code == 2 and "--until 'next tuesday':" in r.output and "e.g. 2017-11-29" in r.output
    s = EventStore(tmp_path / "shoplens.sqlite3")
    s.add_items(DS, CATALOG.values())
    s.add_events(DS, EVENTS)
    r = runner.invoke(app, ["train", "--dataset", DS, "--task", "click", "--until", "2020-01-01", *ws])
    assert r.exit_code == 2 and "--until 2020-01-01T00:00:00+00:00: after toy's end" in r.output
    r = runner.invoke(app, ["train", "--dataset", DS, "--task", "click", "--until", "2017-11-20", *ws])
    assert r.exit_code == 2 and "fall before toy's first event (2017-11-25 12:00): give a later --until" in r.output
    assert "building" not in r.output
    r = runner.invoke(app, ["train", "--dataset", "nope", "--task", "click", *ws])
    assert r.exit_code == 2 and "--dataset nope: no such dataset" in r.output and "building" not in r.output
    r = runner.invoke(app, ["click", "--dataset", DS, "--user", "u1", "--item", "P1", *ws])
    assert r.exit_code == 2 and "shoplens train --dataset toy --task click --model bert" in r.output
    r = runner.invoke(app, ["intent", "--dataset", DS, "--user", "x" * 50_000, "--item", "P1", "--no-llm", *ws])
    assert r.exit_code == 2 and "user_id: 50,000 characters; a user id has at most 256" in r.output
    old = tmp_path / "indexes" / DS / "encoder-click"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"cutoffs": ["2017-11-01T00:00:00+00:00"]}))
    r = runner.invoke(app, ["train", "--dataset", DS, "--task", "click", "--cutoffs", "1", "--horizon-hours", "24", *ws])
    flat = " ".join(r.output.split())  # rich wraps long lines
    assert "note: replaces the click encoder" in flat and "(cut-offs 2017-11-01T00:00:00+00:00 .." in flat
    assert "building click cases at 1 daily cut-offs 2017-11-28 06:00 .. 2017-11-28 06:00 UTC" in flat
    assert r.exit_code == 2 and "hold one class only" in r.output  # 3 users cannot fill 3 splits
    r = runner.invoke(app, ["eval", "audience", "--dataset", DS, "--days", "2", "--event-type", "view",
                            "--encoder", "click", *ws])
    assert r.exit_code == 2 and "--encoder click:" in r.output and "--until" in r.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_served_audience_with_the_predicted_source_ranks_as_the_eval_fuses(tuned: tuple, tmp_path: Path) -> None:
    """`audience(predicted="click")` = the eval's fusion of the same sources (`source_scores` +
    `predicted_source` over the pool, `fuse_sources` with `PREDICTED_WEIGHTS`); misuse names
    `predicted`."""
    from agent.app.runtime import Runtime
    from agent.app.service import ShopLensService
    from agent.settings import Settings
    from agent.tasks.audience import (
        POOL,
        POOL_WEIGHTS,
        PREDICTED_WEIGHTS,
        fuse_sources,
        predicted_source,
        source_scores,
    )

    rt = Runtime(Settings(workspace=tmp_path / "ws5", embedder="hashing-64"))
    rt.store.add_items(DS, CATALOG.values())
    rt.store.add_events(DS, EVENTS + [e("u2", "P1", "purchase", -10), e("u3", "P1", "purchase", -30)])
    svc = ShopLensService(rt, use_model=False)
    with pytest.raises(RequestError, match="shoplens train --dataset toy --task click --model bert") as ei:
        asyncio.run(svc.audience(DS, item_id="P1", n=3, predicted="click"))
    assert ei.value.param == "predicted"
    _save_click(tuned, rt)
    with pytest.raises(RequestError, match="give item_id") as ei:
        asyncio.run(svc.audience(DS, campaign_text="red mugs", n=3, predicted="click"))
    assert ei.value.param == "predicted"
    pred = asyncio.run(svc.audience(DS, item_id="P1", n=3, predicted="click"))
    idx = svc.state.audience_index(DS)
    raw = source_scores(idx, "P1")
    pool = [u for u, _, _ in fuse_sources(raw, POOL_WEIGHTS, n=POOL)]
    as_of = svc.state.dataset_end(DS) + timedelta(seconds=1)
    scorer = EncoderScorer.load(rt.settings.index_dir(DS), DS, "click")
    p = predicted_source(scorer, "P1", pool, lambda u: rt.store.user_events(DS, u), as_of, CATALOG)
    want = fuse_sources(raw | {"predicted": p}, PREDICTED_WEIGHTS["click"], n=3)
    assert [(t.user_id, t.score) for t in pred.users] == [(u, s) for u, s, _ in want]
    assert {"repeat", "predicted"} <= set(pred.users[0].source_scores) and len(pool) == 3
    assert any(n.startswith("predicted source: the click encoder") for n in pred.meta.notes)
    asyncio.run(rt.aclose())


def test_fewshot_demos_come_from_the_other_folds_training_users_half_positive() -> None:
    from eval.encoder_eval import ScorersConfig, fewshot_demos

    def case(u: int, label: int) -> object:
        from agent.tasks.encoder_cases import EncoderCase
        return EncoderCase(user_id=f"u{u}", item_id="i", cutoff=C, label=label, text=f"t{u}", source="touched",
                           funnel=None)  # type: ignore[arg-type]

    pool = [case(u, int(u % 5 == 0)) for u in range(400)]
    cfg = ScorersConfig(folds=2, seed=0)
    for k in (0, 1):
        demos = fewshot_demos(pool, k, cfg)  # type: ignore[arg-type]
        assert len(demos) == 8 and sum(d.label for d in demos) == 4
        assert all(user_fold(d.user_id, 2, 0) != k and user_split(d.user_id, 0, train=0.8, val=0.2) == "train"
                   for d in demos)
        assert fewshot_demos(pool, k, cfg) == demos  # the same prefix every time  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fold 0: 0 positive .* need 4 of each"):
        fewshot_demos([case(u, 0) for u in range(50)], 0, cfg)  # type: ignore[arg-type]


@pytest.mark.slow
def test_train_encoder_end_to_end_saves_a_checked_model_with_test_intervals(tmp_path: Path) -> None:
    """`train_encoder` on a synthetic shop (90 users; carts lead to buys): every split has both
    classes, no user is in two splits, the saved folder loads and scores like the fitted model,
    and the manifest's test metrics carry bootstrap intervals and the paired difference."""
    from agent.tasks.encoder_train import train_encoder

    rng = random.Random(3)
    store = EventStore(tmp_path / "ws" / "shoplens.sqlite3")
    store.add_items(DS, CATALOG.values())
    evs = []
    for u in range(90):
        for cut in (C - timedelta(hours=24), C):
            item = rng.choice(list(CATALOG))
            evs.append(BehaviorEvent(user_id=f"s{u}", item_id=item, event_type="view", timestamp=cut - timedelta(hours=10)))
            if rng.random() < 0.4:
                evs.append(BehaviorEvent(user_id=f"s{u}", item_id=item, event_type="cart", timestamp=cut - timedelta(hours=2)))
                if rng.random() < 0.8:
                    evs.append(BehaviorEvent(user_id=f"s{u}", item_id=item, event_type="purchase", timestamp=cut + timedelta(hours=3)))
    store.add_events(DS, sorted(evs, key=lambda e: (e.user_id, e.timestamp)))
    cfg = FineTuneConfig(batch_size=8, max_steps=4, eval_every=2, max_len=48, seed=0)
    folder = tmp_path / "enc"
    fitted = train_encoder(store, DS, "purchase", cutoffs=[C - timedelta(hours=24), C], horizon_h=12, folder=folder,
                           cfg=cfg, neg_per_pos=4)
    man = json.loads((folder / "manifest.json").read_text())
    assert man["neg_per_pos"] == 4 and man["horizon_h"] == 12 and len(man["cutoffs"]) == 2
    assert {k: v["n"] > 0 for k, v in man["cases"].items()} == {"train": True, "val": True, "test": True}
    assert sum(v["users"] for v in man["cases"].values()) == 90  # each user in exactly one split
    tm = man["test_metrics"]
    assert set(tm) == {"baseline", "bert", "blend"} and "roc_auc_diff" not in tm["baseline"]
    for m in ("bert", "blend"):
        lo, hi = tm[m]["roc_auc_ci"]
        assert lo <= tm[m]["roc_auc"] <= hi and len(tm[m]["roc_auc_diff_ci"]) == 2
    assert tm["baseline"]["roc_auc"] > 0.8  # a cart is the buy signal here, and the baseline reads carts
    back = load_trained(folder, DS, "purchase", "retrain")
    x = ["item: cat x. here: 1 views 1 carts 0 favs 0 buys, last 2.0 h ago"]
    assert back.clf.predict_proba(x)[0] == pytest.approx(fitted.clf.predict_proba(x)[0], abs=1e-6)
