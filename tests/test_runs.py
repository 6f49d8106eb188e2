"""eval/runs.py: run folders, the git commit, tolerant JSONL and the rescore registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eval import aspect_eval, churn_eval, encoder_eval, routing_eval, runner, sentiment_eval
from eval.runs import RESCORERS, git_commit, read_jsonl, rescore, rescorer, run_folder, run_kind


def test_run_folder_names_and_out_wins(tmp_path: Path) -> None:
    d = run_folder("churn", runs_dir=tmp_path, stamp="20260101-120000")
    assert d == tmp_path / "20260101-120000-churn" and d.is_dir()
    b = run_folder("bench", runs_dir=tmp_path, stamp="20260101-120000", stamp_last=True, create=False)
    assert b == tmp_path / "bench-20260101-120000" and not b.exists()
    assert run_folder("churn", out=tmp_path / "mine", runs_dir=tmp_path / "x") == tmp_path / "mine"
    assert re.fullmatch(r"\d{8}-\d{6}-x", run_folder("x", runs_dir=tmp_path).name)


def test_git_commit_is_a_sha_or_unknown() -> None:
    sha = git_commit()
    assert sha == "unknown" or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", sha)
    short = git_commit(short=True)
    assert short == "unknown" or re.fullmatch(r"[0-9a-f]{7,12}(-dirty)?", short)


def test_read_jsonl_skips_blank_and_torn_lines(tmp_path: Path) -> None:
    p = tmp_path / "cases.jsonl"
    p.write_text('{"i": 0}\n\n{"i": 1}\n{"i": 2, "tor', encoding="utf-8")
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize(("config", "kind"), [
    ({"run": {"ranker": "pop"}, "protocol": "llmrank"}, "next_item"),
    ({"set": "zh", "labels": ["negative", "positive"], "ranker": "llm"}, "sentiment"),
    ({"task": "aspects", "set": "semeval14-laptops-test"}, "aspects"),
    ({"questions": "eval/routing_questions.jsonl", "n": 48}, "routing"),
])
def test_run_kind_from_config(tmp_path: Path, config: dict[str, object], kind: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert run_kind(tmp_path) == kind


def test_registry_points_at_each_harness_rescore() -> None:
    assert set(RESCORERS) == {"next_item", "sentiment", "aspects", "routing", "intent_scorers", "churn"}
    assert rescorer("next_item") is runner.rescore
    assert rescorer("churn") is churn_eval.rescore
    assert rescorer("intent_scorers") is encoder_eval.rescore
    assert rescorer("sentiment") is sentiment_eval.rescore
    assert rescorer("aspects") is aspect_eval.rescore
    assert rescorer("routing") is routing_eval.rescore
    with pytest.raises(ValueError, match="unknown run kind 'intent'; known: next_item, sentiment"):
        rescorer("intent")


def test_rescore_refuses_task_evals_and_non_runs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"task": "intent", "seed": 0}))
    with pytest.raises(ValueError, match="no rescore for task 'intent'"):
        rescore(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        rescore(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps({"task": "aspects"}))
    with pytest.raises(FileNotFoundError, match="cases.jsonl not found"):
        rescore(tmp_path)


def test_rescore_dispatches_an_aspects_run(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"task": "aspects", "set": "s", "ranker": "llm", "seed": 1}))
    rec = {"id": "1", "text": "battery is great", "gold": [["battery", "positive"]],
           "pred": [["battery", "positive"]], "valid": True, "seconds": 0.0}
    (tmp_path / "cases.jsonl").write_text(json.dumps(rec) + "\n")
    assert rescore(tmp_path) == json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "report.md").read_text().startswith("# Aspect extraction: s / llm")
