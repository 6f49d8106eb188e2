"""`shoplens intent | churn | profile | audience` and their evals (thin: flags in, service out).

`register(app)` adds the four task commands to a Typer app; `eval_intent_cmd`,
`eval_churn_cmd` and `eval_audience_cmd` are plain functions to mount under `shoplens eval`.
JSON goes to stdout, notes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import CallerError
from agent.domain.predictions import ClickScorer, IntentScorer
from agent.domain.schemas import parse_timestamp
from agent.settings import load_settings
from ui.options import NoLLM, Workspace


def _date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


MAX_HORIZON_H = 2160.0  # 90 days, the API's bound (ui/api/schemas.py)


def _horizon(value: float | None) -> float | None:
    """--horizon-hours: None or a finite number in (0, 2160]."""
    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_HORIZON_H):
        typer.echo(f"error: --horizon-hours {value:g} is not a horizon; give hours in (0, {MAX_HORIZON_H:g}], "
                   "e.g. 48", err=True)
        raise typer.Exit(2)
    return value


def _run(workspace: Path | None, no_llm: bool, call: Any) -> None:
    """Build the runtime, run `call(service)`, print JSON; caller mistakes exit 2."""
    rt = Runtime(load_settings(workspace=workspace))
    svc = ShopLensService(rt, use_model=not no_llm)

    async def go() -> BaseModel:
        try:
            return await call(svc)
        finally:
            await rt.aclose()

    try:
        pred = asyncio.run(go())
    except CallerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if pred.meta.degraded:
        typer.echo(f"note: degraded answer: {pred.meta.degraded_reason}", err=True)
    typer.echo(json.dumps(pred.model_dump(mode="json"), ensure_ascii=False, indent=2))


def intent_cmd(
    user: Annotated[str, typer.Option(help="user id")],
    item: Annotated[str | None, typer.Option(help="item id; leave out for session intent (will the user buy "
                                             "anything in the current session?)")] = None,
    dataset: Annotated[str, typer.Option(help="ingested dataset")] = "taobao",
    as_of: Annotated[str | None, typer.Option(help="cut-off (ISO or unix s); default: after the user's last event")] = None,
    horizon_hours: Annotated[float | None, typer.Option(
        help="purchase horizon in hours (default: 48 for an item; the rest of the current session, "
             "which ends after 30 min without activity, for session intent)")] = None,
    workspace: Workspace = None,
    no_llm: NoLLM = False,
    scorer: Annotated[IntentScorer | None, typer.Option(
        help="with --item, who gives the probability: baseline, bert (the fine-tuned encoder: run `shoplens "
             "train --task purchase --model bert` first), llm, or blend (the stack trained on validation); "
             "default: the baseline blended with the model")] = None,
) -> None:
    """Purchase intent for an item or the current session.

    With --item: P(the user buys the item within the horizon), with funnel evidence. Without --item: session intent, P(the user buys anything later in the current session, or
    within --horizon-hours), with the session's evidence (views, carts, favourites, pace, history).
    """
    when, horizon_hours = _date(as_of), _horizon(horizon_hours)
    if scorer is not None and item is None:
        typer.echo("error: --scorer needs --item (session intent has one scorer: the baseline blended with the "
                   "model)", err=True)
        raise typer.Exit(2)
    if item is None:
        _run(workspace, no_llm, lambda s: s.session_intent(dataset, user, as_of=when, horizon_hours=horizon_hours))
    else:
        _run(workspace, no_llm, lambda s: s.intent(dataset, user, item, as_of=when, scorer=scorer,
                                                   horizon_hours=48.0 if horizon_hours is None else horizon_hours))


def click_cmd(
    user: Annotated[str, typer.Option(help="user id")],
    item: Annotated[str, typer.Option(help="item id")],
    dataset: Annotated[str, typer.Option(help="ingested dataset with a trained click encoder")] = "taobao",
    as_of: Annotated[str | None, typer.Option(help="cut-off (ISO or unix s); default: after the user's last event")] = None,
    horizon_hours: Annotated[float | None, typer.Option(
        help="click horizon in hours (default and only choice: the one the encoder was trained for)")] = None,
    scorer: Annotated[ClickScorer, typer.Option(
        help="baseline (funnel logistic regression fitted on the click cases), bert (the fine-tuned encoder) "
             "or blend (the two stacked on validation users)")] = "blend",
    workspace: Workspace = None,
) -> None:
    """P(the user views or clicks an item within the horizon).

    Click prediction, served by the dataset's click encoder: train it first with `shoplens train --dataset D --task
    click --model bert`. No generative model is asked; the answer is milliseconds.
    """
    when, horizon_hours = _date(as_of), _horizon(horizon_hours)
    _run(workspace, True, lambda s: s.click(dataset, user, item, as_of=when, horizon_hours=horizon_hours,
                                            scorer=scorer))


def churn_cmd(
    user: Annotated[str, typer.Option(help="user id")],
    as_of: Annotated[str, typer.Option(help="as-of date, e.g. 2011-09-01")],
    dataset: Annotated[str, typer.Option(help="ingested dataset")] = "online-retail",
    horizon_days: Annotated[int, typer.Option(help="no purchase within this many days = churn")] = 90,
    workspace: Workspace = None,
    no_llm: NoLLM = False,
) -> None:
    """Churn risk: P(no purchase in N days), drivers, action.

    The probability blends an RFM baseline with the model's yes/no answer; a risk band, the
    computed drivers and a retention action from a closed set come with it.
    """
    when = _date(as_of)
    assert when is not None
    _run(workspace, no_llm, lambda s: s.churn(dataset, user, as_of=when, horizon_days=horizon_days))


def profile_cmd(
    user: Annotated[str, typer.Option(help="user id")],
    dataset: Annotated[str, typer.Option(help="ingested dataset")] = "online-retail",
    as_of: Annotated[str | None, typer.Option(help="profile as of this date (default: after the last event)")] = None,
    workspace: Workspace = None,
    no_llm: NoLLM = False,
) -> None:
    """A user's interests, price level, rhythm and lifecycle.

    Every attribute is computed from the events; the model writes a summary and claims that cite
    them, and never infers sensitive attributes.
    """
    _run(workspace, no_llm, lambda s: s.profile(dataset, user, as_of=_date(as_of)))


def audience_cmd(
    item: Annotated[str | None, typer.Option(help="item id to target")] = None,
    text: Annotated[str | None, typer.Option(help="or a short campaign text")] = None,
    dataset: Annotated[str, typer.Option(help="ingested dataset")] = "online-retail",
    n: Annotated[int, typer.Option("-n", "--n", help="how many users")] = 50,
    score_top: Annotated[int, typer.Option(help="users the model scores and explains")] = 3,
    workspace: Workspace = None,
    no_llm: NoLLM = False,
    predicted: Annotated[Literal["click", "purchase"] | None, typer.Option(
        help="with --item: also rank by the fine-tuned click or purchase encoder's probability (train it "
             "with `shoplens train --task click|purchase --model bert`)")] = None,
) -> None:
    """Rank the users most likely to respond to an item.

    Or to a short campaign text (--text): repeat buyers, co-purchases and similar users fused;
    the model scores and explains the top few. With --predicted, the dataset's fine-tuned
    encoder re-ranks the fusion's top 200 users as one more source.
    """
    _run(workspace, no_llm, lambda s: s.audience(dataset, item_id=item, campaign_text=text, n=n, score_top=score_top,
                                                 predicted=predicted))


def register(app: typer.Typer) -> None:
    """Add `intent`, `click`, `churn`, `profile` and `audience` to `app`."""
    app.command("intent")(intent_cmd)
    app.command("click")(click_cmd)
    app.command("churn")(churn_cmd)
    app.command("profile")(profile_cmd)
    app.command("audience")(audience_cmd)


# ---- evals (mount under `shoplens eval`) -------------------------------------------------------

Cases = Annotated[int, typer.Option(help="cases scored by the model (the baseline scores all)")]
UseModel = Annotated[bool, typer.Option("--model/--no-model", help="run the model-backed part")]
Out = Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")]


Explain = Annotated[int, typer.Option(help="of the model cases, how many also get the explanation call")]
Budget = Annotated[float | None, typer.Option(help="stop starting model cases after this many seconds "
                                              "(resume later with the same --out; 0 re-scores recorded cases)")]


def eval_intent_cmd(cases: Annotated[int | None, typer.Option(
                        help="cases scored by the model (the baseline scores all); default 150, "
                             "60 with --session")] = None, model: UseModel = True, seed: int = 0, out: Out = None,
                    explain: Explain = 10, budget_s: Budget = None, workspace: Workspace = None,
                    session: Annotated[bool, typer.Option(
                        "--session", help="session intent: will the user buy anything later in the session? "
                        "(one case per session, cut after its first k events or its first cart)")] = False,
                    cut: Annotated[str, typer.Option(help="with --session: k<N> (after the first N events) "
                                                     "or first-cart")] = "k3",
                    horizon_hours: Annotated[float | None, typer.Option(
                        help="label = a purchase within this many hours of the cut (default: 48 per item; "
                             "with --session, later in the same session)")] = None,
                    dataset: Annotated[str, typer.Option(
                        help="stored dataset; taobao keeps its published cut-offs, any other gets its "
                             "last horizon as the test label period")] = "taobao",
                    scorers: Annotated[str | None, typer.Option(
                        help="comma list of baseline,bert,llm,blend (and llm_fewshot: the model with 8 labelled "
                             "training cases in the prompt): the fine-tuned encoder beside the LLM on the same "
                             "test cases (cross-fitted by user; fine-tunes one encoder per fold)")] = None,
                    task: Annotated[Literal["purchase", "click"], typer.Option(
                        help="with --scorers: purchase (eval intent's pairs) or click within the horizon")] = "purchase",
                    llm_cases: Annotated[Path | None, typer.Option(
                        help="with --scorers: cases.jsonl of an `eval intent --cases N` run whose model answers to "
                             "reuse (the same sample for the same N and seed)")] = None,
                    folds: Annotated[int, typer.Option(min=2, max=10, help="with --scorers: user folds")] = 2,
                    test_negatives: Annotated[int, typer.Option(
                        min=0, help="with --scorers: test negatives scored (every positive is; 0: all)")] = 4000,
                    curve: Annotated[str | None, typer.Option(
                        help="with --scorers: training-set sizes for the data-size curve, e.g. "
                             "100,300,1000,3000,10000 (one fine-tuning each)")] = None,
                    max_steps: Annotated[int | None, typer.Option(
                        min=1, help="with --scorers: cap on fine-tuning steps per model")] = None,
                    neg_per_pos: Annotated[float, typer.Option(
                        min=1, help="with --scorers: training negatives kept per positive (the rest are "
                                    "dropped; validation is weighted back to the natural balance)")] = 20.0,
                    as_json: Annotated[bool, typer.Option("--json", help="with --scorers: print the metrics "
                                                          "as one JSON object")] = False) -> None:
    """Purchase intent (Taobao or --dataset): AUC, Brier, calibration vs baseline.

    ROC AUC, PR AUC, Brier score and calibration; the model blend against the logistic baseline.

    Per (user, item) pair by default; with --session, per session. With --scorers, the
    fine-tuned BERT encoder, the logistic baseline, the LLM and their blend side by side on the
    same test cases, with bootstrap CIs and paired differences (docs/tasks_results.md).
    """
    settings = load_settings(workspace=workspace)
    if scorers is not None:
        _eval_scorers(settings, scorers=scorers, task=task, cases=cases, model=model, seed=seed, out=out,
                      budget_s=budget_s, dataset=dataset, horizon_hours=horizon_hours, llm_cases=llm_cases,
                      folds=folds, test_negatives=test_negatives, curve=curve, max_steps=max_steps,
                      neg_per_pos=neg_per_pos, as_json=as_json)
        return
    if session:
        from eval.session_intent_eval import run_session_intent_eval

        n = 60 if cases is None else cases
        try:
            run = run_session_intent_eval(settings, rule=cut, horizon_hours=_horizon(horizon_hours),
                                          n_model=n if model else 0, seed=seed, out=out,
                                          n_explain=min(explain, n), budget_s=budget_s, dataset=dataset)
        except ValueError as e:  # a bad --cut, or too few labelled sessions for this horizon
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
        typer.echo(str(run))
        return
    from eval.tasks_eval import run_intent_eval

    try:
        run = run_intent_eval(settings, n_model=(150 if cases is None else cases) if model else 0, seed=seed,
                              out=out, n_explain=explain, budget_s=budget_s, dataset=dataset,
                              horizon_hours=48.0 if horizon_hours is None else horizon_hours)
    except ValueError as e:  # an unknown dataset, or no labelled pairs of both classes
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(str(run))


def _eval_scorers(settings: Any, *, scorers: str, task: str, cases: int | None, model: bool, seed: int,
                  out: Path | None, budget_s: float | None, dataset: str, horizon_hours: float | None,
                  llm_cases: Path | None, folds: int, test_negatives: int, curve: str | None,
                  max_steps: int | None, neg_per_pos: float, as_json: bool) -> None:
    """`eval intent --scorers ...` (eval.encoder_eval): flags in, run folder or JSON out; exit 2 on bad input."""
    from agent.tasks.encoder import FineTuneConfig
    from eval.encoder_eval import ScorersConfig, run_scorers_eval

    try:
        names = tuple(x.strip() for x in scorers.split(",") if x.strip())
        try:
            sizes = tuple(int(x) for x in curve.split(",")) if curve else ()
        except ValueError as e:
            raise ValueError(f"--curve {curve}: give training-set sizes as a comma list, e.g. 100,300,1000") from e
        if any(x < 10 for x in sizes):
            raise ValueError(f"--curve {curve}: every size must be at least 10 labelled cases")
        model_scorers = {"llm", "llm_fewshot"}
        if not model and model_scorers & set(names):
            names = tuple(n for n in names if n not in model_scorers)
            if not names:
                raise ValueError("--scorers llm with --no-model: nothing left to score; drop --no-model")
        if not names:
            raise ValueError("--scorers: name at least one of baseline, bert, llm, blend")
        cfg = ScorersConfig(dataset=dataset, task=task,  # type: ignore[arg-type]
                            scorers=names, horizon_hours=48.0 if horizon_hours is None else horizon_hours,
                            folds=folds, test_negatives=test_negatives or None, n_llm=300 if cases is None else cases,
                            llm_cases=str(llm_cases) if llm_cases else None, budget_s=budget_s, seed=seed,
                            curve=sizes, neg_per_pos=neg_per_pos, finetune=FineTuneConfig(seed=seed, max_steps=max_steps))
        run, metrics = run_scorers_eval(settings, cfg, out=out, progress=not as_json)
    except ValueError as e:  # an unknown dataset or scorer, a bad --curve, or one class only
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if as_json:  # llm and blend_llm are measured on the LLM sample only (their n says so)
        sample = metrics.get("llm_sample", {}).get("scorers", {})
        both = metrics["all"]["scorers"] | {k: v for k, v in sample.items() if k in ("llm", "blend_llm")}
        typer.echo(json.dumps({"run": str(run), "scorers": both, "llm_sample": sample, "cost": metrics["cost"]},
                              default=str))
    else:
        typer.echo(str(run))


def eval_churn_cmd(cases: Cases = 150, model: UseModel = True, seed: int = 0, out: Out = None,
                   explain: Explain = 10, budget_s: Budget = None, workspace: Workspace = None,
                   dataset: Annotated[str, typer.Option(
                       help="stored dataset; online-retail keeps its published dates, any other gets its last "
                            "horizon as the test label period")] = "online-retail",
                   horizon_days: Annotated[int, typer.Option(help="churned = no purchase in this many days")] = 90,
                   ) -> None:
    """Churn (Online Retail or --dataset): model vs RFM baseline.

    Online Retail: the RFM baseline is trained at 2011-06-01 and tested at 2011-09-01; the label
    is no purchase in the next 90 days. Another dataset: tested one horizon before its end.
    """
    from eval.churn_eval import run_churn_eval

    try:
        run = run_churn_eval(load_settings(workspace=workspace), n_model=cases if model else 0, seed=seed, out=out,
                             n_explain=explain, budget_s=budget_s, dataset=dataset, horizon_days=horizon_days)
    except ValueError as e:  # an unknown dataset, or no buyers of both classes
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(str(run))


# eval.audience_eval.AUDIENCE_EVENT_TYPES: the events that may define an item's audience.
AudienceEventType = Literal["purchase", "cart", "favourite", "view", "review"]


def eval_audience_cmd(items: Annotated[int, typer.Option(
                          min=1, help="evaluate the items with the largest held-out audiences, at most this many")] = 30,
                      n: Annotated[int, typer.Option("-n", "--n", min=1, help="top-N users ranked per item")] = 50,
                      out: Annotated[Path | None, typer.Option(
                          help="run folder (default <workspace>/runs/<time>-audience); its files are "
                               "rewritten")] = None,
                      workspace: Workspace = None,
                      dataset: Annotated[str, typer.Option(
                          help="stored dataset; online-retail keeps its published month 2011-11-09..12-09, any "
                               "other gets its last --days as the held-out period")] = "online-retail",
                      days: Annotated[int | None, typer.Option(
                          min=1, help="held-out period = the last N days before the data's end, tuned on the N "
                                      "days before that (default 30; online-retail without --days: its "
                                      "published month)")] = None,
                      event_type: Annotated[AudienceEventType, typer.Option(
                          help="the events that make a user part of an item's audience (review for "
                               "review-only data such as amazon-beauty)")] = "purchase",
                      encoder: Annotated[Literal["click", "purchase"] | None, typer.Option(
                          help="also the predicted source: the dataset's trained click or purchase encoder "
                               "re-ranking each item's top --pool users (train it with --until the validation "
                               "period's start; the eval refuses one that saw those days)")] = None,
                      pool: Annotated[int, typer.Option(min=10, max=5000, help="with --encoder: users per item the "
                                                        "encoder scores")] = 200) -> None:
    """Audience targeting (Online Retail or --dataset): HR@N, NDCG@N on a held-out period.

    The audience of an item = the users with an --event-type event on it in the held-out period;
    the fused sources against the category-popularity baseline, with indexes built on earlier
    events only. Metrics are fractions in [0, 1]. With --encoder, the fine-tuned encoder's
    predicted probability is one more source (alone, and in the fusion tuned on validation).
    """
    from eval.audience_eval import run_audience_eval

    try:
        run = run_audience_eval(load_settings(workspace=workspace), dataset=dataset, days=days,
                                event_type=event_type, n_items=items, n=n, out=out, encoder=encoder, pool=pool)
    except ValueError as e:  # an unknown dataset, no such events in the held-out period, or a leaky encoder
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(str(run))


if __name__ == "__main__":  # python -m ui.tasks_cli <command> ...
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    _app.command("eval-intent")(eval_intent_cmd)
    _app.command("eval-churn")(eval_churn_cmd)
    _app.command("eval-audience")(eval_audience_cmd)
    _app(prog_name="tasks", args=sys.argv[1:])
