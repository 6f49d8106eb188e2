"""The fine-tuned BERT sentiment baseline: the encoder's K-way head and calibration, the eval's
`bert` ranker (data handling, wiring, resume), and the accuracy interval every run reports.

The fine-tuning tests use the real packaged MiniLM for a few steps on hand-written sentences
(no hub access; marked slow: 13-57 s each on 2 shared cores); they skip when the package is absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agent.tasks.encoder import (
    EncoderClassifier,
    FineTuneConfig,
    fine_tune,
    fit_temperature,
    multiclass_log_loss,
    softmax,
)
from eval.runs import read_jsonl
from eval.sentiment_bert import (
    balance,
    balanced_weights,
    cross_domain_cases,
    encoder_text,
    sentence_cases,
    split_validation,
)
from eval.sentiment_eval import Case, SentimentRunConfig, compute_metrics, load_set, run_sentiment

POS = ["I love this phone, it works perfectly.", "Great battery life and a bright screen.",
       "Excellent quality, highly recommend it.", "Fantastic product, exactly what I wanted.",
       "Works great and arrived quickly.", "The sound is amazing and clear.", "Very happy with this purchase.",
       "Best headset I have ever owned.", "Easy to use and really comfortable.", "Wonderful value for the money.",
       "It fits perfectly and looks beautiful.", "Superb build, very sturdy.",
       "I am delighted, it does everything well.", "Five stars, would buy again.",
       "The charger is fast and reliable.", "Absolutely brilliant, my family loves it.",
       "Great customer service and a great product.", "Nice design and excellent performance.",
       "Everything works as described, very pleased.", "This case is great, solid and pretty.",
       "Love it, the best gift ever.", "Impressive quality for such a low price.", "Perfect, no complaints at all.",
       "Really good, I use it every day."]
NEG = ["Terrible phone, it broke after two days.", "The battery dies in an hour, awful.", "Poor quality, do not buy.",
       "Worst purchase I have ever made.", "It stopped working and support ignored me.",
       "The sound is horrible and crackles.", "Very disappointed with this product.",
       "Cheap plastic that cracked immediately.", "Useless, it never charged at all.", "A complete waste of money.",
       "It does not fit and looks ugly.", "Flimsy and badly made.", "I hate it, nothing works properly.",
       "One star, I am returning it.", "The charger overheats and is unreliable.", "Awful experience, it arrived broken.",
       "Rude customer service and a bad product.", "Ugly design and terrible performance.",
       "Nothing works as described, very unhappy.", "This case is junk, it fell apart.", "Hate it, the worst gift ever.",
       "Shockingly bad quality even for the price.", "Defective, full of problems.", "Really bad, I regret buying it."]
NEU = ["It is a phone case.", "The box contains a cable and a manual.", "It arrived on Tuesday.",
       "The colour is grey.", "I bought it for my brother.", "It uses a USB cable.", "The size is medium.",
       "It came in a cardboard box."]


def _encoder_available() -> None:
    pytest.importorskip("transformers", reason="transformers not installed: run `make setup`")
    from agent.tasks.encoder import base_encoder_dir
    try:
        base_encoder_dir()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"packaged MiniLM absent ({e}): run `make setup`")


# ---- calibration maths, hand-computed ---------------------------------------------------------


def test_softmax_and_multiclass_log_loss_hand_values() -> None:
    p = softmax(np.array([[0.0, math.log(2.0), 0.0]]))  # exp: 1, 2, 1 -> 1/4, 1/2, 1/4
    assert p == pytest.approx(np.array([[0.25, 0.5, 0.25]]))
    assert softmax(np.array([[0.0, math.log(4.0)]]), temperature=2.0) == pytest.approx(np.array([[1 / 3, 2 / 3]]))
    # -ln(1/2) for the first case, -ln(1/4) for the second; weights 3 and 1
    probs = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    assert multiclass_log_loss([0, 2], probs) == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert multiclass_log_loss([0, 2], probs, weights=[3, 1]) == pytest.approx((3 * math.log(2) + math.log(4)) / 4)


def test_fit_temperature_softens_overconfident_logits_and_sharpens_timid_ones() -> None:
    # margin 10 on every case but only 3 of 4 right: the NLL-optimal softmax gives p(right) = 3/4,
    # i.e. 10 / T = ln 3 -> T = 10 / ln 3
    logits = np.array([[10.0, 0.0]] * 4)
    assert fit_temperature(logits, [0, 0, 0, 1]) == pytest.approx(10 / math.log(3), rel=1e-3)
    # margin 0.1, always right: sharpen as far as the bound allows (T = 0.05)
    assert fit_temperature(np.array([[0.1, 0.0]] * 4), [0, 0, 0, 0]) == pytest.approx(0.05, rel=1e-3)


def test_fine_tune_rejects_labels_outside_the_head() -> None:
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        fine_tune((["a", "b"], [0, 3]), (["c"], [1]), FineTuneConfig(num_labels=3))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fine_tune((["a", "b"], [0, 2]), (["c"], [1]), FineTuneConfig())
    with pytest.raises(ValueError, match="at least 2"):
        fine_tune((["a"], [0]), (["c"], [0]), FineTuneConfig(num_labels=1))


# ---- the ranker's data handling ---------------------------------------------------------------


def test_balance_repeats_rarer_classes_up_to_the_largest() -> None:
    cases = [Case(f"p{i}", "x", "positive") for i in range(6)] + [Case(f"n{i}", "y", "negative") for i in range(2)]
    out = balance(cases, seed=1)
    assert len(out) == 12
    ids = [c.id for c in out]
    assert sorted(i for i in ids if i.startswith("p")) == [f"p{i}" for i in range(6)]  # each positive once
    assert ids.count("n0") == 3 and ids.count("n1") == 3  # 2 negatives cycled to 6


def test_balanced_weights_hand_values() -> None:
    # 3 positive, 1 negative, K = 2: positive 4 / (2 * 3) = 2/3, negative 4 / (2 * 1) = 2
    assert balanced_weights(["positive"] * 3 + ["negative"], ["negative", "positive"]) == pytest.approx(
        [2 / 3, 2 / 3, 2 / 3, 2.0])


def test_sentence_cases_keep_sentences_whose_aspects_agree() -> None:
    cases = [Case("a0", "Great screen, awful keyboard.", "positive", aspect="screen"),
             Case("a1", "Great screen, awful keyboard.", "negative", aspect="keyboard"),
             Case("a2", "Fast and quiet fan.", "positive", aspect="fan"),
             Case("a3", "Fast and quiet fan.", "positive", aspect="speed"),
             Case("r0", "Lovely cream.", "positive")]
    out = sentence_cases(cases)
    assert sorted((c.text, c.gold, c.aspect) for c in out) == [("Fast and quiet fan.", "positive", None),
                                                             ("Lovely cream.", "positive", None)]


def test_validation_is_a_stratified_seeded_share() -> None:
    cases = [Case(f"p{i}", "x", "positive") for i in range(80)] + [Case(f"n{i}", "y", "negative") for i in range(20)]
    fit, val = split_validation(cases, seed=3)
    assert len(val) == 15 and len(fit) == 85
    assert sum(c.gold == "negative" for c in val) == 3  # 20% of 15
    assert [c.id for c in split_validation(cases, seed=3)[1]] == [c.id for c in val]
    assert not {c.id for c in fit} & {c.id for c in val}


def test_encoder_text_cleans_and_puts_the_aspect_first() -> None:
    assert encoder_text(Case("x", "<b>Nice</b> &amp; fast", "positive"), 600) == "Nice & fast"
    assert encoder_text(Case("x", "The fan is loud.", "negative", aspect="fan"), 600) == "fan [SEP] The fan is loud."
    assert encoder_text(Case("x", "abcdef", "negative"), 3) == "abc"


def test_cross_domain_refuses_the_target_itself_and_chinese(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="OTHER sets"):
        cross_domain_cases("amazon_cells", ["amazon_cells"], ["negative", "positive"], tmp_path, 10, 0)
    with pytest.raises(ValueError, match="English-only"):
        cross_domain_cases("amazon_cells", ["zh"], ["negative", "positive"], tmp_path, 10, 0)
    with pytest.raises(ValueError, match="English-only"):
        run_sentiment(SentimentRunConfig(set="zh", ranker="bert", out=tmp_path / "r"), data_dir=tmp_path)
    with pytest.raises(ValueError, match="for the bert ranker"):
        run_sentiment(SentimentRunConfig(set="amazon_cells", ranker="tfidf", train_on=("beauty",)), data_dir=tmp_path)


def test_every_run_reports_a_wilson_interval_on_accuracy() -> None:
    # 2 right of 10: Wilson (1927) 95% interval (0.0567, 0.5098)
    recs = [{"gold": "positive", "pred": "positive" if i < 2 else "negative", "pred3": "negative", "valid": True,
             "probs": {}, "seconds": 0.0} for i in range(10)]
    m = compute_metrics(recs, ["negative", "positive"])
    assert m["accuracy"] == 0.2 and m["accuracy_ci95"] == pytest.approx([0.0567, 0.5098], abs=1e-4)


# ---- real fine-tuning, a few steps ------------------------------------------------------------


@pytest.mark.slow  # 13-57 s measured on 2 shared cores
def test_a_tiny_fine_tune_lowers_validation_log_loss() -> None:
    _encoder_available()
    xt, yt = POS[:16] + NEG[:16], [1] * 16 + [0] * 16
    xv, yv = POS[16:] + NEG[16:], [1] * 8 + [0] * 8
    cfg = FineTuneConfig(batch_size=8, max_steps=10, eval_every=5, patience=10, lr=1e-4, max_len=32, threads=2)
    clf, hist = fine_tune((xt, yt), (xv, yv), cfg)
    # step 0 is the untrained head, the reference; then every 5 steps
    assert [c["step"] for c in hist.checks] == [0, 5, 10] and hist.steps == 10 and hist.stopped == "max steps"
    first, last = hist.checks[0]["val_log_loss"], hist.checks[-1]["val_log_loss"]
    assert last < first and last < 0.5 * math.log(2)  # well below a coin's log loss, ln 2
    p = clf.predict_proba(xv)
    assert p.shape == (16,) and ((p > 0.5) == np.array(yv, dtype=bool)).mean() >= 0.8
    assert clf.class_probabilities(xv[:2]).sum(axis=1) == pytest.approx([1.0, 1.0])


@pytest.mark.slow  # 13-57 s measured on 2 shared cores
def test_a_three_way_head_is_temperature_calibrated_and_survives_save_and_load(tmp_path: Path) -> None:
    _encoder_available()
    x = POS[:8] + NEG[:8] + NEU[:6]
    y = [2] * 8 + [0] * 8 + [1] * 6
    xv, yv = POS[8:11] + NEG[8:11] + NEU[6:], [2] * 3 + [0] * 3 + [1] * 2
    clf, hist = fine_tune((x, y), (xv, yv), FineTuneConfig(batch_size=8, max_steps=4, eval_every=4, lr=1e-4,
                                                            max_len=32, num_labels=3, threads=2))
    assert clf.num_labels == 3 and 0.05 <= clf.temperature <= 20 and [c["step"] for c in hist.checks] == [0, 4]
    probs = clf.class_probabilities(xv)
    assert probs.shape == (8, 3) and probs.sum(axis=1) == pytest.approx(np.ones(8))
    with pytest.raises(ValueError, match="class_probabilities"):
        clf.predict_proba(xv)
    folder = clf.save(tmp_path / "enc", {"task": "t", "dataset": "d", "template": "v1"})
    back = EncoderClassifier.load(folder, dataset="d", task="t", template="v1", fix="retrain")
    assert back.temperature == pytest.approx(clf.temperature)
    assert back.class_probabilities(xv) == pytest.approx(probs, abs=1e-5)


def _amazon_cells_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "sentiment").mkdir(parents=True)
    lines = [f"{s}\t1" for s in POS] + [f"{s}\t0" for s in NEG]
    (d / "sentiment" / "amazon_cells_labelled.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


@pytest.mark.slow  # 13-57 s measured on 2 shared cores
def test_the_bert_ranker_scores_every_test_case_once_and_resumes_without_retraining(tmp_path: Path) -> None:
    _encoder_available()
    data = _amazon_cells_dir(tmp_path)
    enc = FineTuneConfig(batch_size=8, max_steps=3, eval_every=3, lr=1e-4, max_len=32, threads=2)
    cfg = SentimentRunConfig(set="amazon_cells", n=10, ranker="bert", out=tmp_path / "run", encoder=enc)
    run = run_sentiment(cfg, data_dir=data)
    _, test, _ = load_set("amazon_cells", data, 10, cfg.seed)  # the split the tfidf ranker uses too
    recs = read_jsonl(run / "cases.jsonl")
    assert [r["id"] for r in recs] == [c.id for c in test]
    for r in recs:
        assert set(r["probs"]) == {"negative", "positive"} and sum(r["probs"].values()) == pytest.approx(1.0)
        assert r["pred"] == max(r["probs"], key=r["probs"].get) and r["valid"] is True and r["seconds"] > 0
    conf = json.loads((run / "config.json").read_text())
    assert conf["n_train"] == 38 and conf["n_val"] == 6 and conf["fine_tune"]["steps"] == 3
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] == 10 and m["fit_seconds"] == conf["fit_seconds"] > 0 and len(m["accuracy_ci95"]) == 2
    assert (run / "encoder" / "manifest.json").exists() and not (run / "encoder.work").exists()
    # an interrupted run: the last 4 cases lost; the rerun reloads the saved encoder and scores only those
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:6]))
    run_sentiment(SentimentRunConfig(set="amazon_cells", n=10, ranker="bert", out=run, encoder=enc), data_dir=data)
    again = read_jsonl(run / "cases.jsonl")
    assert [r["id"] for r in again] == [c.id for c in test]
    assert [r["probs"]["positive"] for r in again[6:]] == pytest.approx([r["probs"]["positive"] for r in recs[6:]])
    assert json.loads((run / "config.json").read_text())["fit_seconds"] == conf["fit_seconds"]  # not retrained


# ---- paired comparison ------------------------------------------------------------------------


def _cases_file(path: Path, rights: list[bool]) -> Path:
    path.write_text("".join(json.dumps({"id": f"c{i}", "gold": "positive", "pred": "positive" if ok else "negative"})
                            + "\n" for i, ok in enumerate(rights)))
    return path


def test_paired_accuracy_hand_computed(tmp_path: Path) -> None:
    from eval.sentiment_paired import paired_accuracy

    a = _cases_file(tmp_path / "a.cases.jsonl", [True, True, False, False, True])
    run = tmp_path / "b-run"
    run.mkdir()
    _cases_file(run / "cases.jsonl", [True, False, True, True, True])
    r = paired_accuracy(a, run)
    # b - a per case: 0, -1, +1, +1, 0 -> mean 0.2; discordant 2 vs 1 -> exact p = 1.0
    assert (r["n"], r["first"], r["other"]) == (5, 0.6, 0.8) and r["diff"] == pytest.approx(0.2)
    assert (r["other_only_right"], r["first_only_right"]) == (2, 1) and r["mcnemar_p"] == pytest.approx(1.0)
    assert -1 <= r["ci95"][0] <= 0.2 <= r["ci95"][1] <= 1
    # 8 discordant cases all one way: p = 2 / 2^8
    x = _cases_file(tmp_path / "x.jsonl", [False] * 8 + [True] * 4)
    y = _cases_file(tmp_path / "y.jsonl", [True] * 12)
    assert paired_accuracy(x, y)["mcnemar_p"] == pytest.approx(2 / 256)


def test_paired_accuracy_refuses_runs_of_different_sets(tmp_path: Path) -> None:
    from eval.sentiment_paired import paired_accuracy

    a = _cases_file(tmp_path / "a.jsonl", [True])
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"id": "c0", "gold": "negative", "pred": "negative"}) + "\n")
    with pytest.raises(ValueError, match="different gold labels"):
        paired_accuracy(a, b)
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"id": "z9", "gold": "negative", "pred": "negative"}) + "\n")
    with pytest.raises(ValueError, match="share no test case"):
        paired_accuracy(a, c)


def test_the_cli_refuses_a_train_on_set_the_encoder_cannot_read(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from ui.sentiment_cli import eval_sentiment_cmd

    app = typer.Typer()
    app.command()(eval_sentiment_cmd)
    app.command("other")(lambda: None)  # two commands: typer keeps the command name
    res = CliRunner().invoke(app, ["eval-sentiment-cmd", "--set", "amazon_cells", "--ranker", "bert",
                                   "--train-on", "zh", "--out", str(tmp_path / "r")],
                           env={"SHOPLENS_DATA_DIR": str(tmp_path / "no-data")})  # refused before any data is read
    assert res.exit_code == 2 and "English-only" in res.output
