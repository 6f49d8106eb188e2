"""`shoplens eval`: the offline harness from the command line (thin: flags in, eval/ called).

Each run writes <workspace>/runs/<timestamp>-<name>/ (config, per-case records, metrics, report)
and resumes when interrupted. Also runnable alone: ``python -m ui.eval_cli next-item ...``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from agent.app.feedback import FeedbackReport, FeedbackSummary
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.llm.base import ModelUnavailableError
from agent.settings import load_settings
from agent.tasks.next_item import LlmScorer
from eval.run_checks import is_builtin
from eval.runner import RunConfig, run_next_item
from eval.runs import rescore
from ui.options import Profile, Workspace

# The closed value sets of `eval next-item` (eval.runner.RANKERS, eval.protocols; checked equal
# in tests/test_cli_help.py), as Literal types so --help lists them.
Ranker = Literal["pipeline", "random", "pop", "covisit", "bm25", "embedding", "fused", "fused-sasrec",
                 "llm", "llm-perm", "llm-generate", "llm-fewshot", "llm-pointwise", "hybrid",
                 "hybrid-pointwise"]
Protocol = Literal["leave-one-out", "leave-last-basket", "temporal", "llmrank", "full"]
Candidates = Literal["random", "retrieved", "full", "bm25", "pop", "bpr", "gru4rec", "sasrec", "bert", "6k-random",
                     "6k-pop"]
ServedSource = Literal["covisit", "embedding", "similar_users", "popularity", "recent"]  # agent.data.candidates.SOURCES
# --protocol left out: the dataset's built-in protocol, else leave-one-out
DEFAULT_PROTOCOL = {"amazon-games": "llmrank", "amazon-industrial": "full", "online-retail": "leave-last-basket"}
Split = Literal["test", "valid"]
Position = Literal["shuffle", "first", "last"]

# Every `shoplens eval` command with the example its --help shows.
EVAL_EXAMPLES: dict[str, str] = {
    "next-item": "shoplens eval next-item --dataset my-shop --protocol leave-one-out --candidates random --ranker pop",
    "rescore": "shoplens eval rescore runs/<run>",
    "compare": "shoplens eval compare runs/<a> runs/<b>",
    "export": "shoplens eval export runs/<run> --to docs/results",
    "sentiment": "shoplens eval sentiment --set zh --n 150 --ranker llm",
    "aspects": "shoplens eval aspects --n 60",
    "sentiment-transfer": "shoplens eval sentiment-transfer --lang zh --per-domain 20",
    "intent": "shoplens eval intent --session --cut k3",
    "churn": "shoplens eval churn --cases 150",
    "audience": "shoplens eval audience --items 30 -n 50",
    "feedback": "shoplens eval feedback --dataset online-retail",
    "faithfulness": "shoplens eval faithfulness --task next_item --dataset online-retail --n 100",
}

FUSION_RANKERS = ("fused", "fused-sasrec", "hybrid", "hybrid-pointwise")  # fitted fusion (--drop)
SASREC_RANKERS = ("fused-sasrec", "hybrid", "hybrid-pointwise")  # SASRec source (--sasrec)

eval_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help=__doc__)


@eval_app.command("next-item")
def next_item_cmd(
    dataset: Annotated[str, typer.Option(help="any dataset in the workspace's store (shoplens ingest), or the "
                                         "built-in amazon-games / amazon-industrial files")] = "amazon-games",
    protocol: Annotated[Protocol | None, typer.Option(
        help="leave-one-out (last item held out), leave-last-basket (last purchase basket), temporal "
             "(events after --cutoff are test) on any stored dataset; built-in: llmrank (amazon-games), full "
             "(amazon-games, amazon-industrial). Default: amazon-games llmrank, amazon-industrial full, "
             "online-retail its built-in leave-last-basket, any other dataset leave-one-out")] = None,
    candidates: Annotated[Candidates, typer.Option(
        help="what is ranked: random (the target + N-1 random items the user never touched), retrieved (the "
             "served candidate generator's top N: the target may be missing), full (the whole catalogue); "
             "llmrank: a Games-200 candidate file or 6k-random / 6k-pop. online-retail's leave-last-basket "
             "with random is the built-in protocol (its own 20 retrieved by the fused sources)")] = "random",
    split: Annotated[Split, typer.Option(help="amazon-industrial split")] = "test",
    users: Annotated[int, typer.Option(help="evaluate the first N users (0: all); generic protocols: a seeded "
                                       "sample of N eligible users")] = 200,
    ranker: Annotated[Ranker | None, typer.Option(
        help="pipeline (the served next-item pipeline, as the API answers), a baseline, the fusion, or a model "
             "ranker. Default: pipeline (with the model; --no-llm without) on leave-one-out, temporal and a "
             "stored dataset's leave-last-basket; fused on the built-in llmrank / full and online-retail's "
             "built-in leave-last-basket")] = None,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="pipeline without the model")] = False,
    untrained: Annotated[bool, typer.Option("--untrained", help="pipeline (and, on a stored dataset, the "
                                            "candidate generator) with the hand-set fusion weights (default: "
                                            "fitted on the training data)")] = False,
    source: Annotated[ServedSource | None, typer.Option(
        help="pipeline ranked by this one served source alone (its single-source ablation)")] = None,
    n_candidates: Annotated[int, typer.Option(help="generic protocols: candidates per case, and K of the "
                                              "generator's recall@K")] = 20,
    min_history: Annotated[int, typer.Option(help="generic protocols: distinct items a history needs "
                                             "(users with fewer are skipped and counted)")] = 1,
    cutoff: Annotated[str | None, typer.Option(
        help="temporal: start of the test period, ISO-8601 or unix seconds (default: 90% of events before)")] = None,
    llm_scorer: Annotated[LlmScorer | None, typer.Option(
        help="pipeline's LLM scorer (default: the served setting, SHOPLENS_LLM_SCORER)")] = None,
    llm_weight: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="pipeline's model weight in the final score (default: the served one: the "
        "store's fitted weight from `shoplens train --llm`, else 0, when the model does not rank)")] = None,
    fit_llm_weight: Annotated[int | None, typer.Option(
        min=5, help="pipeline: first fit the model weight on this many validation windows of the pipeline's "
        "store (as `shoplens train --llm`), then rank with what it serves")] = None,
    prompt: Annotated[str | None, typer.Option(help="prompt ref, e.g. next_item_rank_titles.v1")] = None,
    seed: Annotated[int, typer.Option(help="case shuffle + tie-break seed (LLMRank: 2023)")] = 2023,
    position: Annotated[Position, typer.Option(help="where the target sits in the candidate list "
                                               "(first / last: the position-bias check)")] = "shuffle",
    permutations: Annotated[int, typer.Option(help="verbalizer passes for llm-perm / hybrid")] = 2,
    hybrid_val_users: Annotated[int, typer.Option(help="validation users for the hybrid weight")] = 40,
    hybrid_w: Annotated[float | None, typer.Option(help="fix the hybrid LLM weight (skip the search)")] = None,
    fewshot_k: Annotated[int, typer.Option(help="demonstrations for llm-fewshot")] = 1,
    profile: Profile = None,
    sasrec: Annotated[Path | None, typer.Option(
        help="trained SASRec folder (python -m eval.train_sasrec): hybrid fuses it too; "
             "default $SHOPLENS_SASREC")] = None,
    drop: Annotated[str | None, typer.Option(
        help="ablation: refit the fusion without this source (e.g. sasrec, covisit)")] = None,
    repurchase: Annotated[bool, typer.Option(
        "--repurchase", help="full / leave-last-basket: history items may be candidates")] = False,
    name: Annotated[str | None, typer.Option(help="run name (folder suffix)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default: <workspace>/runs/<time>-<name>); an "
                                             "existing one with the same config resumes")] = None,
    workspace: Workspace = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Next-item ranking: HR@K, NDCG@K under one protocol.

    Ranks the next item for N users with one ranker and writes a run folder (config, cases with
    raw responses, metrics, report; metrics in percent); an interrupted run resumes with the same
    --out. On a stored dataset every report also gives the served candidate generator's recall@N.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    protocol = protocol or DEFAULT_PROTOCOL.get(dataset, "leave-one-out")  # type: ignore[assignment]
    assert protocol is not None
    cfg = RunConfig(dataset=dataset, protocol=protocol, candidates=candidates, split=split,
                    users=users or None, ranker=ranker, prompt=prompt, seed=seed, position=position,
                    permutations=permutations, hybrid_val_users=hybrid_val_users, hybrid_w=hybrid_w,
                    fewshot_k=fewshot_k, model_profile=profile, name=name, out=out, no_llm=no_llm,
                    untrained=untrained, llm_scorer=llm_scorer, llm_weight=llm_weight,
                    fit_llm_weight=fit_llm_weight, n_candidates=n_candidates,
                    min_history=min_history, cutoff=cutoff, source=source, workspace=workspace)
    ranker = cfg.ranker  # type: ignore[assignment]
    generic = not is_builtin(cfg)
    misuse = ("--no-llm applies to --ranker pipeline" if no_llm and ranker != "pipeline"
              else "--untrained applies to --ranker pipeline" if untrained and ranker != "pipeline" and not generic
              else "--source applies to --ranker pipeline" if source and ranker != "pipeline"
              else "--llm-weight applies to --ranker pipeline with the model" if llm_weight is not None
              and (ranker != "pipeline" or no_llm)
              else "--fit-llm-weight applies to --ranker pipeline with the model, without --llm-weight"
              if fit_llm_weight and (ranker != "pipeline" or no_llm or llm_weight is not None)
              else "--repurchase applies to --protocol full / leave-last-basket" if repurchase and protocol == "llmrank"
              else "--drop applies to --ranker fused, fused-sasrec, hybrid or hybrid-pointwise" if drop and ranker not in FUSION_RANKERS
              else "--sasrec applies to --ranker fused-sasrec, hybrid or hybrid-pointwise" if sasrec and ranker not in SASREC_RANKERS
              else "--n-candidates, --min-history and --cutoff apply to --protocol leave-one-out, leave-last-basket "
                   "or temporal" if not generic and (n_candidates != 20 or min_history != 1 or cutoff)
              else None)
    if misuse:
        typer.echo(f"error: {misuse} (got --protocol {protocol} --ranker {ranker})", err=True)
        raise typer.Exit(2)
    if sasrec is not None:
        if not sasrec.is_dir():
            typer.echo(f"error: --sasrec {sasrec}: no such folder; train one with "
                       "`python -m eval.train_sasrec`", err=True)
            raise typer.Exit(2)
        cfg.sasrec = str(sasrec)
    if drop is not None:
        cfg.fusion_drop = drop
    cfg.repurchase = repurchase
    try:
        run_dir = run_next_item(cfg)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    except ModelUnavailableError as e:
        typer.echo(f"error: {e}\nthe cases done so far are kept: re-run with the same flags and "
                   "--out <run folder> to resume", err=True)
        raise typer.Exit(3) from e
    text = (run_dir / "metrics.json").read_text()
    typer.echo(text)
    for line in _run_warnings(json.loads(text), users, cfg.candidates):
        typer.echo(f"note: {line}", err=True)
    typer.echo(f"run folder: {run_dir}", err=True)


def _run_warnings(metrics: dict[str, Any], users: int | None, candidates: str) -> list[str]:
    """What a reader of the metrics must know before trusting them: fewer users evaluated than
    asked for, and random candidate sets whose targets are mostly items the user touched before
    (the negatives never are, so "touched before?" alone ranks those targets first)."""
    out = []
    n = int(metrics.get("n_cases", 0))
    if users and n < users:
        out.append(f"{n} of the {users} users asked for were evaluated; report.md and config.json say "
                   "why the others were skipped")
    repeat = float(metrics.get("target_in_history_rate", 0.0))
    if candidates == "random" and repeat >= 50.0:
        out.append(f"{repeat:.0f}% of the targets are items the user touched before, and random negatives never "
                   "are: these figures reward 'touched before?' (see ndcg@10_new_items, and --candidates retrieved)")
    return out


@eval_app.command("rescore")
def rescore_cmd(run_dir: Annotated[Path, typer.Argument(help="a run folder")]) -> None:
    """Recompute a run's metrics from its recorded cases.

    No model is called. Works for next-item, sentiment, aspects, routing, intent --scorers and
    churn runs (the kind is read from the run's config.json).
    """
    try:
        metrics = rescore(run_dir)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False))


@eval_app.command("export")
def export_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished next-item run folders")],
    to: Annotated[Path, typer.Option(help="where the result files go")] = Path("docs/results"),
) -> None:
    """Write small result files (config, metrics, per-user NDCG@10) to commit beside the docs."""
    from eval.report import export_run

    for d in run_dirs:
        try:
            typer.echo(export_run(d, to))
        except FileNotFoundError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e


@eval_app.command("compare")
def compare_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders")],
    out: Annotated[Path | None, typer.Option(help="where compare.png goes (default: first run)")] = None,
) -> None:
    """Side-by-side metrics of next-item runs, plus a plot.

    With two runs on the same cases, also the paired per-user NDCG difference.
    """
    from eval.report import compare

    try:
        typer.echo(compare(run_dirs, out))
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e


@eval_app.command("feedback")
def feedback_cmd(
    dataset: Annotated[str | None, typer.Option(help="only this dataset's recommendations (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout (the same as GET /v1/feedback/report)")]
    = False,
    workspace: Workspace = None,
) -> None:
    """Click-through of served recommendations, replayed from the feedback log.

    Impressions, clicks and purchases clients sent to POST /v1/feedback, by answer stage
    (fast, refined, explained, precomputed): CTR with its 95% Wilson interval, purchase rate,
    and CTR by shown position. CTR is shown items clicked / shown items, where a shown item is
    one with a logged impression; clicks without one, and repeat clicks, are counted beside it
    and never raise the CTR. No model is called.
    """
    rt = Runtime(load_settings(workspace=workspace))
    store = rt.feedback
    try:
        report = ShopLensService(rt, use_model=False).feedback_report(dataset)
    finally:
        store.close()
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    out, err = Console(), Console(stderr=True)
    if not report.overall.recommendations:
        err.print(f"no recommendations logged{f' for {dataset}' if dataset else ''} in {rt.settings.workspace}")
        return
    for table in _feedback_tables(report):
        out.print(table)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _feedback_tables(report: FeedbackReport) -> list[Table]:
    """The report as two rich tables: counts and rates by stage, then CTR by shown position."""
    groups: list[tuple[str, FeedbackSummary]] = [*report.by_stage.items(), ("all", report.overall)]
    title = f"Feedback{f' on {report.dataset}' if report.dataset else ''}"
    counts = Table(title=title, title_justify="left")
    for col in ("stage", "recommendations", "impressions", "clicks", "purchases", "CTR", "CTR 95% CI",
                "purchase rate", "clicks w/o impression", "repeat clicks"):
        counts.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in groups:
        ci = "-" if s.ctr_ci95 is None else f"{_pct(s.ctr_ci95[0])} - {_pct(s.ctr_ci95[1])}"
        counts.add_row(name, f"{s.recommendations:,}", f"{s.impressions:,}", f"{s.clicks:,}", f"{s.purchases:,}",
                       _pct(s.ctr), ci, _pct(s.purchase_rate), f"{s.clicks_without_impression:,}",
                       f"{s.repeat_clicks:,}")
    by_pos = Table(title="CTR by shown position (clicks / impressions)", title_justify="left")
    by_pos.add_column("position", justify="right")
    for name, _ in groups:
        by_pos.add_column(name, justify="right")
    for p in range(1, len(report.overall.by_position) + 1):
        cells = []
        for _, s in groups:
            row = s.by_position[p - 1] if p <= len(s.by_position) else None
            cells.append("-" if row is None or not (row.impressions or row.clicks)
                         else f"{_pct(row.ctr)} ({row.clicks}/{row.impressions})")
        by_pos.add_row(str(p), *cells)
    return [counts, by_pos]


if __name__ == "__main__":
    eval_app()


@eval_app.command("faithfulness")
def faithfulness_cmd(
    task: Annotated[Literal["next_item", "churn", "intent", "profile", "audience", "chat"], typer.Option(
        help="whose sentences: next_item (each reason's why and the intent summary), churn or intent (the "
             "reason), profile (the summary and each claim), audience (the targeting reasons for the item "
             "each sampled user bought last), chat (the answer to 'what will customer X buy next, and "
             "why?')")] = "next_item",
    lang: Annotated[Literal["en", "zh"], typer.Option(help="chat: the question's (and answer's) language")] = "en",
    prompt: Annotated[str | None, typer.Option(help="chat: the answer prompt (default chat_answer.v2)")] = None,
    facts_first: Annotated[bool, typer.Option(
        "--facts-first/--model-writes-all", help="chat: a next-item answer opens with the template's ranking and "
        "the model writes why (the served default), or the model writes it all (--prompt)")] = True,
    dataset: Annotated[str, typer.Option(help="a stored dataset (shoplens ingest)")] = "online-retail",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="answers: users sampled (seeded)")] = 100,
    seed: int = 0,
    k: Annotated[int, typer.Option("-k", min=1, help="next_item: items per answer")] = 5,
    min_events: Annotated[int, typer.Option(min=1, help="skip users with fewer events")] = 3,
    out: Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="rewrite metrics.json and report.md from "
                                              "--out's cases.jsonl, no model")] = False,
    workspace: Workspace = None,
) -> None:
    """Faithfulness: the model's sentences against the verifier, with the real model.

    For --n answers of --task from the served pipeline (the code the API, CLI and chat run):
    the share of model-written sentences verified as written, verified after the one repair,
    and replaced by the labelled template, with 95% Wilson intervals; unlabelled template
    fallbacks (must be 0); and seeded wrong sentences per failure class, each of which the
    verifier must catch. Writes cases.jsonl (resumable), metrics.json and report.md.
    """
    from eval.faithfulness_eval import run_faithfulness_eval, write_report

    settings = load_settings(workspace=workspace)
    try:
        if report_only:
            if out is None or not (out / "cases.jsonl").exists():
                raise ValueError("--report-only needs --out with a cases.jsonl of an earlier run")
            rt = Runtime(settings)
            cfg = json.loads((out / "config.json").read_text())
            arts = rt.artifacts(cfg["dataset"])
            d = write_report(out, arts.title_index, {i: it.title for i, it in arts.catalog.items()})
        else:
            d = run_faithfulness_eval(settings, task=task, dataset=dataset, n=n, seed=seed, out=out, k=k,
                                      min_events=min_events, lang=lang, prompt=prompt, facts_first=facts_first)
    except (ValueError, ModelUnavailableError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo((d / "report.md").read_text())
    typer.echo(f"run folder: {d}")
