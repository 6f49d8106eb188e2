"""Aspect-extraction eval: grouping SemEval .seg triples, hand-computed term/joint F1, the
SemEval train-lexicon baseline, and a CLI run that rescoring reproduces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eval.aspect_eval import (
    TrainLexicon,
    aspect_metrics,
    detokenize,
    load_aspect_sentences,
    normalise_term,
    rescore,
)
from ui.cli import app

SEG = """$T$ is great but the screen is dim .
battery life
1
battery life is great but the $T$ is dim .
screen
-1
The $T$ arrived on time .
box
0
"""


def test_seg_triples_group_into_sentences(tmp_path: Path) -> None:
    p = tmp_path / "t.seg"
    p.write_text(SEG)
    s = load_aspect_sentences(p)
    assert [x.text for x in s] == ["battery life is great but the screen is dim.", "The box arrived on time."]
    assert s[0].gold == [("battery life", "positive"), ("screen", "negative")]
    assert s[1].gold == [("box", "neutral")]


def test_bad_polarity_line_is_named(tmp_path: Path) -> None:
    p = tmp_path / "t.seg"
    p.write_text("$T$ ok .\nkeys\n2\n")
    with pytest.raises(ValueError, match=r"t.seg:3: polarity '2' is not -1, 0 or 1"):
        load_aspect_sentences(p)


def test_metrics_hand_computed() -> None:
    recs = [
        # gold 2 terms; pred finds both terms, one polarity wrong, plus one extra term
        {"gold": [["battery life", "positive"], ["screen", "negative"]],
         "pred": [["Battery life", "positive"], ["screen.", "positive"], ["price", "neutral"]], "valid": True},
        # a failed case: its gold term is a miss
        {"gold": [["box", "neutral"]], "pred": [], "valid": False},
    ]
    m = aspect_metrics(recs)
    # terms: tp 2, pred 3, gold 3 -> P = R = F1 = 2/3; joint: tp 1 -> 1/3
    assert (m["term_precision"], m["term_recall"], m["term_f1"]) == (66.67, 66.67, 66.67)
    assert (m["joint_precision"], m["joint_recall"], m["joint_f1"]) == (33.33, 33.33, 33.33)
    assert m["polarity_acc_on_matched"] == 50.0
    assert m["valid_rate"] == 50.0
    assert normalise_term("  'Battery   Life'. ") == "battery life"


def test_train_lexicon_prefers_longest_term_and_majority_polarity(tmp_path: Path) -> None:
    p = tmp_path / "train.seg"
    p.write_text(SEG + "$T$ died fast .\nbattery\n-1\nThe $T$ is bad .\nscreen\n-1\nThe $T$ is bright .\nscreen\n1\n"
                 "Nice $T$ .\nscreen\n-1\n")
    lex = TrainLexicon(load_aspect_sentences(p))
    assert lex.predict("The battery life and the screen .") == [("battery life", "positive"), ("screen", "negative")]
    assert lex.predict("Screens are fine") == []  # whole words only


def test_cli_run_then_rescore_reproduces(tmp_path: Path) -> None:
    d = tmp_path / "data" / "sentiment"
    d.mkdir(parents=True)
    (d / "Laptops_Test_Gold.xml.seg").write_text(SEG)
    (d / "Laptops_Train.xml.seg").write_text("The $T$ is dim .\nscreen\n-1\n")
    from eval.aspect_eval import run_aspect_eval

    run = run_aspect_eval(0, ranker="train-lexicon", data_dir=tmp_path / "data", out=tmp_path / "run")
    m = json.loads((run / "metrics.json").read_text())
    # the lexicon finds "screen" (negative) in sentence 1 only: term P 1/1, R 1/3
    assert (m["term_precision"], m["term_recall"], m["joint_f1"]) == (100.0, 33.33, 50.0)
    assert rescore(run) == m
    bad = CliRunner().invoke(app, ["eval", "aspects", "--ranker", "gpt", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'gpt' is not one of 'llm', 'train-lexicon'" in bad.output  # --ranker's choices


def test_detokenize_undoes_semeval_tokenisation() -> None:
    assert detokenize("I 've paid $ 150 ( twice ) , do n't ask .") == "I've paid $150 (twice), don't ask."
