"""The eval harness end to end on a tiny synthetic LLMRank setup, with FakeModel (no network)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.llm.base import Completion, ModelUnavailableError, Usage
from agent.llm.fake import FakeCall, FakeModel
from eval.baselines import FusedRanker, PopularityScorer, SequenceModelScorer
from eval.llm_rankers import parse_generated
from eval.protocols import UserSequence, llmrank_cases
from eval.runner import RunConfig, Suite, arun_next_item, read_cases, rescore
from eval.suites import load_sasrec_source
from retrieval.popularity import Popularity
from ui.eval_cli import eval_app

QUALITY = ("ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20", "hr@1", "hr@5", "hr@10", "hr@20", "mrr",
           "valid_rate", "hit@1_valid_all_users", "n_cases")
FILES = ("config.json", "prompt_sample.txt", "cases.jsonl", "metrics.json", "report.md",
         "ndcg_at_k.png")


def _suite(n_users: int = 8) -> Suite:
    items = [f"i{j}" for j in range(60)]
    titles = {i: f"Game number {i[1:]}" for i in items}
    interactions = {
        f"u{u}": UserSequence(f"u{u}", tuple(items[(u + k) % 60] for k in range(6)),
                              items[(u * 7 + 30) % 60])
        for u in range(n_users)
    }
    cand = {u: [i for i in items if i not in s.history][::-1] for u, s in interactions.items()}
    cases = llmrank_cases(interactions, cand, seed=1, source="synthetic")
    train = [list(s.history) for s in interactions.values()]
    pop = PopularityScorer(Popularity().fit(train))
    fused = FusedRanker([pop], [1.0])
    return Suite([(c, [c.target], True) for c in cases], "synthetic", titles, {"pop": pop}, fused,
                 {"counts": "histories"}, validation=cases[:3],
                 train_by_user={u: list(s.history) for u, s in interactions.items()})


def _letter(call: FakeCall) -> str:
    """A deterministic answer that depends on the prompt."""
    digest = hashlib.sha256(call.messages[-1]["content"].encode()).digest()
    return "ABCDEFGHIJKLMNOPQRST"[digest[0] % 20]


def _config(tmp: Path, ranker: str = "llm-perm", out: str = "run", **kw: object) -> RunConfig:
    kw.setdefault("workspace", tmp / "ws")
    return RunConfig(ranker=ranker, users=None, seed=1, out=tmp / out, hybrid_val_users=3,
                     **kw)  # type: ignore[arg-type]


def _quality(m: dict[str, object]) -> dict[str, object]:
    return {k: m[k] for k in QUALITY}


async def test_run_writes_all_files_and_rescore_reproduces(tmp_path: Path) -> None:
    model = FakeModel(responder=_letter)
    run_dir = await arun_next_item(_config(tmp_path), model=model, suite=_suite(), progress=False)
    for f in FILES:
        assert (run_dir / f).exists(), f
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["prompt"] == "next_item_rank_titles.v1" and cfg["prompt_sha256"]
    assert cfg["model_id"] == "fake-model" and cfg["model_sha256"]
    records = read_cases(run_dir)
    assert len(records) == 8 and all(len(r["responses"]) == 2 for r in records)  # 2 permutations
    before = (run_dir / "metrics.json").read_text()
    assert json.dumps(rescore(run_dir), indent=2, sort_keys=True) == before


async def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    full = await arun_next_item(_config(tmp_path, out="full", workspace=tmp_path / "ws_full"), suite=_suite(),
                                model=FakeModel(responder=_letter), progress=False)
    calls = {"n": 0}

    def flaky(call: FakeCall) -> str:
        calls["n"] += 1
        if calls["n"] > 6:  # 3 cases x 2 permutations, then the server "dies"
            raise ModelUnavailableError("server gone")
        return _letter(call)

    cfg = _config(tmp_path, out="resumed", workspace=tmp_path / "ws2")
    with pytest.raises(ModelUnavailableError):
        await arun_next_item(cfg, model=FakeModel(responder=flaky), suite=_suite(), progress=False)
    assert len(read_cases(tmp_path / "resumed")) == 3
    second = FakeModel(responder=_letter)
    await arun_next_item(cfg, model=second, suite=_suite(), progress=False)
    assert len(second.calls) == 5 * 2  # only the 5 remaining cases
    m_full = json.loads((full / "metrics.json").read_text())
    m_res = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert _quality(m_res) == _quality(m_full)


async def test_cache_makes_identical_rerun_free(tmp_path: Path) -> None:
    first = FakeModel(responder=_letter)
    a = await arun_next_item(_config(tmp_path, out="a"), model=first, suite=_suite(), progress=False)
    assert len(first.calls) == 16
    second = FakeModel(responder=_letter)
    b = await arun_next_item(_config(tmp_path, out="b"), model=second, suite=_suite(), progress=False)
    assert second.calls == []
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert _quality(ma) == _quality(mb) and mb["cached_calls"] == 16


async def test_generate_bad_answer_is_invalid_but_counts_for_all_users(tmp_path: Path) -> None:
    replies = ['{"ranking": ["A", "B"]}', "I think the answer is B", '{"ranking": ["Z", "A"]}']

    def responder(call: FakeCall) -> str:
        return replies[len(model.calls) - 1] if len(model.calls) <= 3 else '{"ranking": ["C"]}'

    model = FakeModel(responder=responder)
    cfg = _config(tmp_path, ranker="llm-generate")
    run_dir = await arun_next_item(cfg, model=model, suite=_suite(), progress=False)
    records = read_cases(run_dir)
    assert [r["valid"] for r in records[:3]] == [True, False, False]
    assert all(len(r["ranking"]) == 20 for r in records)  # missing labels go last, nobody dropped
    assert records[1]["extra"]["parsed"] is False and records[2]["extra"]["n_invalid"] == 1
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["n_cases"] == 8 and m["valid_rate"] == pytest.approx(100 * 6 / 8)
    valid_hits = sum(1 for r in records if r["valid"] and r["ranking"][0] == r["target"])
    assert m["hit@1_valid_all_users"] == pytest.approx(100 * valid_hits / 8)


def test_parse_generated() -> None:
    labels = list("ABCD")
    assert parse_generated('{"ranking": ["B", "A"]}', labels)[0] == ["B", "A"]
    order, rep = parse_generated('["B", "B", "x", "d"]', labels)
    assert order == ["B", "D"] and rep["n_duplicate"] == 1 and rep["n_invalid"] == 1
    assert rep["valid"] is False and rep["n_missing"] == 2
    assert parse_generated("nope", labels)[1]["parsed"] is False


async def test_hybrid_records_weight_and_cli_rescore(tmp_path: Path) -> None:
    run_dir = await arun_next_item(_config(tmp_path, ranker="hybrid"), suite=_suite(),
                                   model=FakeModel(responder=_letter), progress=False)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert "hybrid_w" in cfg and cfg["hybrid_weight_search"]["users"] == ["u0", "u1", "u2"]
    result = CliRunner().invoke(eval_app, ["rescore", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads((run_dir / "metrics.json").read_text())
    result = CliRunner().invoke(eval_app, ["compare", str(run_dir), str(run_dir)])
    assert result.exit_code == 0 and "ndcg@10" in result.output


def _oracle_yes(suite: Suite) -> Any:
    """Says "Yes" (P 0.9) only when the asked candidate is that user's held-out target (the user
    is known by the last title of the history shown, distinct per user in `_suite`; the title
    ending last in the prompt, whatever the prompt's history format)."""
    target_after = {suite.titles[c.history[-1]]: suite.titles[c.target] for c, _, _ in suite.cases}

    def answer(call: FakeCall) -> Completion:
        head, tail = call.messages[-1]["content"].split("Candidate product: ")
        last_seen = max(target_after, key=lambda t: head.rfind(t) + len(t) if t in head else -1)
        p = 0.9 if tail.split("\n")[0] == target_after[last_seen] else 0.2
        return Completion(text="Yes", top_logprobs=[{"Yes": math.log(p), "No": math.log(1 - p)}],
                          usage=Usage(50, 1))

    return answer


async def test_pointwise_ranker_through_runner_asks_every_candidate_once(tmp_path: Path) -> None:
    suite = _suite(4)
    model = FakeModel(responder=_oracle_yes(suite))
    run_dir = await arun_next_item(_config(tmp_path, ranker="llm-pointwise"), suite=suite, model=model,
                                   progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ndcg@10"] == 100.0 and metrics["hr@1"] == 100.0  # the oracle's yes wins
    assert len(model.calls) == sum(len(c.candidates) for c, _, _ in suite.cases)
    assert all(c.max_tokens == 1 and c.top_logprobs == 20 for c in model.calls)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["prompt"] == "next_item_pointwise_titles.v1"
    rec = json.loads((run_dir / "cases.jsonl").read_text().splitlines()[0])
    assert rec["extra"]["answered"] == 1.0


async def test_hybrid_pointwise_chooses_its_weight_on_validation_users(tmp_path: Path) -> None:
    suite = _suite(4)
    run_dir = await arun_next_item(_config(tmp_path, ranker="hybrid-pointwise"), suite=suite,
                                   model=FakeModel(responder=_oracle_yes(suite)), progress=False)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["hybrid_weight_search"]["users"] == ["u0", "u1", "u2"]
    assert cfg["hybrid_w"] > 0  # the oracle's margin helps on validation, so it gets weight
    assert json.loads((run_dir / "metrics.json").read_text())["ndcg@10"] == 100.0


async def test_pipeline_ranker_is_the_served_service_with_the_case_candidates(tmp_path: Path) -> None:
    """--ranker pipeline ranks through ShopLensService.next_item: the same answer the API gives
    for the same history and candidate set, with and without the model."""
    from agent.app.service import ShopLensService
    from eval.pipeline import pipeline_runtime, sequence_events

    suite = _suite(4)
    extra = {"embedder": "hashing-64"}
    no_llm = await arun_next_item(_config(tmp_path, ranker="pipeline", out="p0", no_llm=True, untrained=True,
                                          extra=extra), suite=suite, progress=False)
    model = FakeModel(responder=_oracle_yes(suite))
    # what is served to this untrained store: the model does not rank (weight 0), so no call
    served = await arun_next_item(_config(tmp_path, ranker="pipeline", out="p2", llm_scorer="pointwise",
                                          extra=extra), suite=suite, model=FakeModel(), progress=False)
    cfg = json.loads((served / "config.json").read_text())
    assert (cfg["pipeline"]["llm_weight"], cfg["pipeline"]["use_llm_ranking"]) == (0.0, False)
    assert "no model weight was fitted" in cfg["pipeline"]["llm_weight_from"]
    assert read_cases(served)[0]["ranking"] == read_cases(no_llm)[0]["ranking"]
    # the model's contribution at a weight, measured: --llm-weight
    with_llm = await arun_next_item(_config(tmp_path, ranker="pipeline", out="p1", llm_scorer="pointwise",
                                            llm_weight=0.5, extra=extra), suite=suite, model=model, progress=False)
    cfg = json.loads((with_llm / "config.json").read_text())
    assert cfg["pipeline"]["llm_scorer"] == "pointwise" and cfg["pipeline"]["use_llm_ranking"]
    assert cfg["pipeline"]["llm_weight"] == 0.5
    # 4 users are too few to fit the fusion: the served defaults, and config.json says why
    assert "4 users with 3+ items" in cfg["fusion_untrained_because"]
    assert len(model.calls) == sum(len(c.candidates) for c, _, _ in suite.cases)  # one yes/no each
    m0 = json.loads((no_llm / "metrics.json").read_text())
    m1 = json.loads((with_llm / "metrics.json").read_text())
    assert m1["hr@1"] == 100.0 and m1["ndcg@10"] > m0["ndcg@10"]  # the oracle's yes is blended in

    # the same user, history and candidates through the service (as POST /v1/next-item): same ranking
    rt = pipeline_runtime(tmp_path / "ws", "amazon-games", suite.train_by_user, suite.titles,
                          embedder="hashing-64")
    svc = ShopLensService(rt, use_model=False)
    case = suite.cases[0][0]
    pred = await svc.next_item("amazon-games", case.user_id, events=sequence_events(case.user_id, case.history),
                               candidates=list(case.candidates),
                               config=svc.next_item_config(k=len(case.candidates), use_model=False))
    rec = read_cases(no_llm)[0]
    assert rec["ranking"] == [it.item_id for it in pred.items]
    assert rec["scores"] == [it.score for it in pred.items]
    await rt.aclose()


async def test_baseline_ranker_through_runner(tmp_path: Path) -> None:
    run_dir = await arun_next_item(_config(tmp_path, ranker="pop"), suite=_suite(), progress=False)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["valid_rate"] == 100.0 and m["mean_model_calls"] == 0


async def test_other_configuration_in_out_folder_is_refused(tmp_path: Path) -> None:
    await arun_next_item(_config(tmp_path, ranker="pop"), suite=_suite(), progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        await arun_next_item(_config(tmp_path, ranker="random"), suite=_suite(), progress=False)


class _OracleSequenceModel:
    """A stub ``SequenceModel`` that knows every user's next item (so its source must win)."""

    def __init__(self, targets: dict[tuple[str, ...], str]) -> None:
        self.targets = targets
        self.calls = 0

    def score(self, history: object, candidates: object) -> dict[str, float]:
        self.calls += 1
        target = self.targets.get(tuple(history))  # type: ignore[arg-type]
        return {c: float(c == target) for c in candidates}  # type: ignore[union-attr]


def _sasrec_suite() -> tuple[Suite, _OracleSequenceModel]:
    suite = _suite(12)
    stub = _OracleSequenceModel({c.history: c.target for c, _, _ in suite.cases})
    suite.scorers["sasrec"] = SequenceModelScorer(stub)
    suite.validation = [c for c, _, _ in suite.cases[4:]]  # fit on users 4..11
    suite.cases = suite.cases[:4]  # evaluate users 0..3
    return suite, stub


async def test_fused_sasrec_uses_the_sequence_model_source(tmp_path: Path) -> None:
    suite, stub = _sasrec_suite()
    plain = await arun_next_item(_config(tmp_path, ranker="fused", out="f"), suite=suite,
                                 progress=False)
    run_dir = await arun_next_item(_config(tmp_path, ranker="fused-sasrec", out="fs"),
                                   suite=suite, progress=False)
    assert stub.calls >= 8 + 4  # every validation user (weight fit) and every evaluated user
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["fusion_sources"] == ["pop", "sasrec"]
    assert cfg["fusion_refit"]["w_sasrec"] > 1.0 and cfg["fusion_refit"]["n_validation"] == 8
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["ndcg@10"] == 100.0 > json.loads((plain / "metrics.json").read_text())["ndcg@10"]
    # Ablation: dropping the source refits without it.
    abl = await arun_next_item(_config(tmp_path, ranker="fused-sasrec", out="abl",
                                       fusion_drop="sasrec"), suite=suite, progress=False)
    assert json.loads((abl / "config.json").read_text())["fusion_sources"] == ["pop"]


async def test_hybrid_builds_on_fused_sasrec_when_configured(tmp_path: Path) -> None:
    suite, _ = _sasrec_suite()
    run_dir = await arun_next_item(_config(tmp_path, ranker="hybrid", sasrec="stub-folder"),
                                   suite=suite, model=FakeModel(responder=_letter), progress=False)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["fusion_sources"] == ["pop", "sasrec"] and "w_sasrec" in cfg["fusion_refit"]
    assert cfg["run"]["sasrec"] == "stub-folder"
    with pytest.raises(ValueError, match="no SASRec source"):
        await arun_next_item(_config(tmp_path, ranker="fused-sasrec", out="x"), suite=_suite(),
                             progress=False)


def test_sasrec_folder_is_recorded_with_its_hashes(tmp_path: Path) -> None:
    import torch

    from retrieval.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    seqs = [[f"i{(u + k) % 9}" for k in range(5)] for u in range(20)]
    SASRec(SASRecConfig(hidden=8, max_len=5)).fit(seqs, epochs=1, batch_size=8,
                                             progress=False).save(tmp_path / "m")
    scorer, manifest = load_sasrec_source(tmp_path / "m")
    assert manifest["model_dir"] == str(tmp_path / "m")
    assert len(manifest["config_sha256"]) == 16 and len(manifest["model_pt_sha256"]) == 16
    assert manifest["config"]["hidden"] == 8 and scorer.name == "sasrec"
    with pytest.raises(FileNotFoundError):
        load_sasrec_source(tmp_path / "missing")


def test_cli_sasrec_flag_names_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-sasrec"
    result = CliRunner().invoke(eval_app, ["next-item", "--ranker", "fused-sasrec", "--users", "3",
                                           "--sasrec", str(missing), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert f"--sasrec {missing}: no such folder" in result.output
    assert not (tmp_path / "r").exists()


def test_paired_difference_hand_computed(tmp_path: Path) -> None:
    from eval.report import paired_difference

    def run(name: str, ranks: list[int]) -> Path:
        d = tmp_path / name
        d.mkdir()
        rows = []
        for i, pos in enumerate(ranks):  # target "t" at 0-based position `pos`
            ranking = [f"x{j}" for j in range(20)]
            ranking.insert(pos, "t")
            rows.append(json.dumps({"i": i, "user": f"u{i}", "ranking": ranking[:20], "relevant": ["t"]}))
        (d / "cases.jsonl").write_text("\n".join(rows) + "\n")
        return d

    # NDCG@10 per user: pos 0 -> 100, pos 1 -> 100/log2(3) = 63.09, pos 15 -> 0
    a, b = run("a", [1, 0, 15]), run("b", [0, 0, 1])
    p = paired_difference(a, b)
    g = 100 / math.log2(3)
    diffs = [100 - g, 0.0, g]
    assert p["n"] == 3 and p["better"] == 2 and p["worse"] == 0
    assert p["first"] == pytest.approx((g + 100) / 3) and p["diff"] == pytest.approx(sum(diffs) / 3)
    mean = sum(diffs) / 3
    assert p["se"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2) / math.sqrt(3))


async def test_exported_results_reproduce_the_paired_difference_without_the_runs(tmp_path: Path) -> None:
    from eval.report import compare, export_run, paired_difference

    a = await arun_next_item(_config(tmp_path, ranker="pop", out="a"), suite=_suite(), progress=False)
    b = await arun_next_item(_config(tmp_path, ranker="llm-perm", out="b"), suite=_suite(),
                             model=FakeModel(responder=_letter), progress=False)
    fa, fb = export_run(a, tmp_path / "results"), export_run(b, tmp_path / "results")
    data = json.loads(fb.read_text())
    assert data["config"]["ranker"] == "llm-perm" and data["metrics"] == json.loads((b / "metrics.json").read_text())
    assert len(data["ndcg@10_per_case"]) == 8 and "responses" not in fb.read_text()  # small: no raw outputs
    from_runs, from_files = paired_difference(a, b), paired_difference(fa, fb)
    assert from_files["n"] == from_runs["n"] == 8
    assert from_files["diff"] == pytest.approx(from_runs["diff"], abs=1e-3)
    assert from_files["ci95"] == pytest.approx(from_runs["ci95"], abs=1e-3)
    assert "| b.json | 8 |" in compare([fa, fb])
    result = CliRunner().invoke(eval_app, ["export", str(tmp_path / "nope"), "--to", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished run folder" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--protocol", "llmrank", "--repurchase", "--ranker", "pop"],
     "error: --repurchase applies to --protocol full / leave-last-basket (got --protocol llmrank --ranker pop)"),
    (["--ranker", "random", "--drop", "bm25"],
     "error: --drop applies to --ranker fused, fused-sasrec, hybrid or hybrid-pointwise "
     "(got --protocol llmrank --ranker random)"),
    (["--ranker", "fused", "--sasrec", "."],
     "error: --sasrec applies to --ranker fused-sasrec, hybrid or hybrid-pointwise "
     "(got --protocol llmrank --ranker fused)"),
])
def test_cli_refuses_flags_its_ranker_would_ignore(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(eval_app, ["next-item", "--users", "2", *args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "r").exists()


def test_compare_refuses_what_it_cannot_compare(tmp_path: Path) -> None:
    other = tmp_path / "sentiment-run"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    nxt = tmp_path / "next-item-run"
    nxt.mkdir()
    (nxt / "metrics.json").write_text(json.dumps({"ndcg@10": 50.0}))
    r = CliRunner().invoke(eval_app, ["compare", str(nxt), str(other)])
    assert r.exit_code == 2 and "is not a next-item run (no ndcg@10 in metrics.json)" in r.output
    r = CliRunner().invoke(eval_app, ["compare", str(tmp_path / "nope")])
    assert r.exit_code == 2 and f"{tmp_path / 'nope'}: no such run folder" in r.output
