"""ShopLens: explained, schema-checked predictions from e-commerce behaviour sequences.

Next items, purchase intent, churn risk, user profiles, audiences and review sentiment, each
citing the customer's own events. JSON goes to stdout, progress and notes to stderr, so
`shoplens recommend ... | jq` works. Every command has --help with an example.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.data.store_schema import StoreConfigError
from agent.domain.errors import CallerError, UnknownUserError
from agent.domain.predictions import NextItemPrediction
from agent.domain.schemas import parse_timestamp
from agent.ingest import saved_mapping
from agent.ingest.generic import NoValidEventsError
from agent.ingest.mapping import ColumnMap, build_column_map
from agent.llm.base import ModelUnavailableError
from agent.settings import load_settings
from agent.tasks.next_item import LlmScorer, NextItemConfig, prediction_json
from ui import precompute_cli, sentiment_cli, serve_llm_cli, tasks_cli
from ui.eval_cli import EVAL_EXAMPLES, eval_app
from ui.options import (
    DataDir,
    FileOrder,
    Header,
    IngestDataset,
    MapFile,
    MapFlags,
    OrderColumn,
    Profile,
    RowEventType,
    TimeFormat,
    Workspace,
    note_degraded,
)

# Every command in the order `shoplens --help` lists them, with the example it shows.
COMMANDS: dict[str, str] = {
    "ingest": "shoplens ingest online-retail",
    "datasets": "shoplens datasets",
    "train": "shoplens train --dataset online-retail",
    "recommend": "shoplens recommend --dataset online-retail --user 17850 -k 5",
    "precompute": "shoplens precompute --dataset online-retail --active-since 2011-11-01 --limit 200",
    "intent": "shoplens intent --dataset taobao --user 1000 --item 5120034",
    "click": "shoplens click --dataset taobao --user 1000 --item 5120034",
    "churn": "shoplens churn --dataset online-retail --user 12347 --as-of 2011-09-01",
    "profile": "shoplens profile --dataset online-retail --user 17850",
    "audience": "shoplens audience --dataset online-retail --item 85123A -n 50",
    "sentiment": 'shoplens sentiment --text "Arrived broken, support never answered"',
    "demo": "shoplens demo",
    "serve": "shoplens serve --port 8000",
    "ui": "shoplens ui --port 7860",
    "serve-llm": "shoplens serve-llm --engine vllm --dry-run",
    "eval": "shoplens eval next-item --dataset amazon-games --users 200 --ranker fused",
    "schema": "shoplens schema",
}


def examples_epilog(examples: list[str], title: str = "Example") -> str:
    """A help epilog that click prints verbatim (the \\b marker stops it re-wrapping lines)."""
    return f"{title}:\n\n\b\n" + "\n".join(f"  {x}" for x in examples)


class _Ordered(TyperGroup):
    """Lists commands in the order of `COMMANDS` (then any others), not registration order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        order = {n: i for i, n in enumerate(COMMANDS)}
        return sorted(names, key=lambda n: order.get(n, len(order)))


app = typer.Typer(cls=_Ordered, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help=__doc__, epilog=examples_epilog(list(COMMANDS.values()), "Examples"))
err = Console(stderr=True)
out = Console()

# Real Online Retail customers with long, varied histories (the demo default).
DEMO_USERS = ("17850", "12347", "13047")


def _runtime(workspace: Path | None, data_dir: Path | None = None, profile: str | None = None) -> Runtime:
    return Runtime(load_settings(workspace=workspace, data_dir=data_dir, llm_profile=profile))


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)  # unwrapped: fixes stay copyable
    return typer.Exit(code)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log at INFO level to stderr")] = False) -> None:
    # SIGTERM -> SystemExit, so atexit handlers run and the embedded model server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("ingest")
def ingest_cmd(
    dataset: Annotated[IngestDataset | None, typer.Argument(
        help="a built-in dataset to load; or give your own file with --events and --name")] = None,
    events: Annotated[Path | None, typer.Option(help="your events export (.csv/.tsv/.jsonl, optionally .gz)")] = None,
    catalog: Annotated[Path | None, typer.Option(help="your catalogue (.csv/.tsv/.jsonl), with --events")] = None,
    name: Annotated[str | None, typer.Option(help="the dataset name to store your data under, with --events")] = None,
    map_: MapFlags = None,
    map_file: MapFile = None,
    header: Header = None,
    time_format: TimeFormat = None,
    order_column: OrderColumn = None,
    file_order: FileOrder = False,
    event_type: RowEventType = None,
    workspace: Workspace = None,
    data_dir: DataDir = None,
    no_index: Annotated[bool, typer.Option("--no-index", help="skip building FAISS indexes")] = False,
) -> None:
    """Load a built-in dataset or your own export; build indexes.

    A built-in dataset is read from the shared data folder. Your own export (--events, --name) is
    mapped with --map/--map-file; the report accounts for every column and every dropped row, and
    the mapping is saved with the dataset (a later ingest under the same --name reuses it). Every
    task then takes --dataset NAME. Walk-through: docs/your-data.md.
    """
    own = (events, name, map_, map_file, header, time_format, order_column, file_order or None, event_type, catalog)
    if dataset is not None and any(x is not None for x in own):
        raise _fail(f"{dataset} is a built-in dataset: drop the --events/--map flags, or load your file "
                    "with --events FILE --name NAME")
    if dataset is None and (events is None or name is None):
        raise _fail("give a built-in dataset (e.g. shoplens ingest online-retail) or your own file with "
                    "--events FILE --name NAME")
    rt = _runtime(workspace, data_dir)
    if dataset is not None:
        try:
            report = rt.ingest(dataset, rebuild_index=not no_index)
        except (ValueError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
        err.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
        err.print(f"store: {rt.store.counts(dataset)} at {rt.store.location}", markup=False, soft_wrap=True)
        return
    assert events is not None and name is not None
    try:
        saved = saved_mapping(rt.store, name) if map_file is None else None
        if saved is not None:
            err.print(f"starting from the mapping saved with {name!r} (flags override it): "
                      f"{json.dumps(saved.model_dump(exclude_defaults=True))}", markup=False, highlight=False,
                      soft_wrap=True)
        cmap = build_column_map(map_ or [], map_file, base=saved, header=header.split(",") if header else None,
                                time_format=time_format, order_column=order_column, file_order=file_order,
                                event_type=event_type)
        own_report = rt.ingest_file(name, events, mapping=cmap, catalog=catalog, rebuild_index=not no_index)
    except NoValidEventsError as e:
        err.print(e.report.summary(), markup=False, highlight=False, soft_wrap=True)
        raise _fail(str(e)) from e
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    err.print(own_report.summary(), markup=False, highlight=False, soft_wrap=True)
    err.print(f"mapping saved with {name!r}: {json.dumps(own_report.source['mapping'])}", markup=False,
              highlight=False, soft_wrap=True)
    err.print(f"store: {rt.store.counts(name)} at {rt.store.location}; next: shoplens recommend --dataset "
              f"{name} --user <id> --no-llm", markup=False, highlight=False, soft_wrap=True)


@app.command("datasets")
def datasets_cmd(
    workspace: Workspace = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout (the same as GET /v1/datasets)")] = False,
) -> None:
    """Stored datasets: counts, index state, embedder (--json)."""
    rows = ShopLensService(_runtime(workspace), use_model=False).datasets()
    if as_json:
        print(json.dumps({"datasets": [d.model_dump() for d in rows]}, indent=2, ensure_ascii=False))
        return
    if not rows:
        err.print("no datasets yet: run `shoplens ingest online-retail`, or load your own export with "
                  "`shoplens ingest --events FILE --name NAME` (docs/your-data.md)", markup=False, soft_wrap=True)
        return
    table = Table(title="Datasets", title_justify="left")
    for col, just in (("dataset", "left"), ("users", "right"), ("items", "right"), ("events", "right"),
                      ("indexes", "left"), ("embedder", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in rows:
        state = f"[green]{d.indexes}[/]" if d.indexes_ready else f"[yellow]{d.indexes}[/]"
        table.add_row(d.name, f"{d.users:,}", f"{d.items:,}", f"{d.events:,}", state, d.embedder or "-")
    out.print(table)


@app.command("train")
def train_cmd(
    dataset: Annotated[str, typer.Option(help="an ingested dataset")],
    users: Annotated[int, typer.Option(min=20, help="leave-one-out validation users to fit on")] = 2000,
    seed: Annotated[int, typer.Option(help="which users, which random negatives")] = 0,
    llm: Annotated[bool, typer.Option("--llm", help="also fit the model's share of the score on validation "
                                      "windows (runs the model: 25-45 s a window on 2 cores)")] = False,
    llm_windows: Annotated[int, typer.Option(min=5, help="validation windows the model scores, with --llm")] = 30,
    workspace: Workspace = None,
    task: Annotated[Literal["next-item", "click", "purchase", "churn"], typer.Option(
        help="next-item: fusion weights (the default); click or purchase: fine-tune a BERT encoder to predict "
             "a click or a purchase of an item within --horizon-hours (purchase is served by `intent --scorer "
             "bert|blend`, click by `shoplens click`; both by `audience --predicted`); churn: the served churn "
             "blend of the RFM baseline and the model, fitted on validation users (runs the model)")
    ] = "next-item",
    model: Annotated[Literal["fusion", "bert"] | None, typer.Option(
        help="what to train: fusion (next-item) or bert (click, purchase); default: the task's only choice")] = None,
    horizon_hours: Annotated[float, typer.Option(min=1, max=24 * 90, help="with --task click|purchase: the "
                                                 "label horizon after each cut-off")] = 48.0,
    cutoffs: Annotated[int, typer.Option(min=1, max=60, help="with --task click|purchase: daily cut-offs "
                                         "to build cases at, the last one a horizon before the data's end")] = 5,
    max_steps: Annotated[int | None, typer.Option(min=1, help="with --task click|purchase: a cap on "
                                                  "fine-tuning steps (batch 32)")] = None,
    neg_per_pos: Annotated[float, typer.Option(min=1, help="with --task click|purchase: training negatives kept "
                                               "per positive (validation is weighted back to the natural "
                                               "balance)")] = 20.0,
    until: Annotated[str | None, typer.Option(help="with --task click|purchase: use only events before this "
                                              "time (ISO date), e.g. to keep a held-out period out of "
                                              "training; default: the data's end")] = None,
    cases: Annotated[int, typer.Option(min=20, help="with --task churn: validation users the model scores "
                                       "(~15 s each on 2 cores)")] = 300,
    as_of: Annotated[str | None, typer.Option(help="with --task churn: the validation cut-off (ISO date); its "
                                              "labels must end before the test period of `eval churn`; default: "
                                              "online-retail 2011-06-01, else two horizons before the data's end")
                     ] = None,
    horizon_days: Annotated[int, typer.Option(min=1, max=730, help="with --task churn: churned = no purchase "
                                              "in this many days")] = 90,
) -> None:
    """Fit fusion weights, or fine-tune a click/purchase encoder.

    Next-item (the default): fit the source weights by leave-one-out. Validation users' last items
    are held out; the sources are refit without them.

    Saves fusion.json beside the dataset's indexes; recommend, the API and the chat use it from
    then on (each answer's meta.notes says which weights ranked it).

    With --llm, also measures the model's ranking on validation windows and saves
    llm_weight.json: the model ranks a dataset only when its paired gain over the pipeline
    without it is significant (95% CI above 0); otherwise its weight stays 0 and it only explains.
    An interrupted --llm run resumes where it stopped.

    --task click|purchase --model bert: fine-tune the packaged MiniLM on (history, item) cases at
    --cutoffs daily cut-offs, users split 70/15/15 into train, validation and test, early-stopped
    on validation log loss and calibrated; the blend with the funnel baseline is chosen on
    validation. Saved as encoder-<task>/ beside the indexes; `intent --scorer bert|blend` serves
    the purchase encoder, `shoplens click` the click encoder, `audience --predicted` either.
    Resumes an interrupted run.

    --task churn: score --cases validation users at --as-of with the served churn prompt and fit
    the blend of the RFM baseline and the model's P(churn); the model gets a weight only when it
    beats the baseline alone by more than one SE of cross-validated log loss, else weight 0
    (answers then serve the baseline's probability and say so in meta.notes). Saved as
    churn_blend-<h>d.json beside the dataset's indexes. A fit whose labels reach the test period
    of `shoplens eval churn` is refused. Resumes an interrupted run.
    """
    from tqdm import tqdm

    churn_flags = cases != 300 or as_of is not None or horizon_days != 90
    if task == "churn":
        if model is not None or llm or users != 2000 or llm_windows != 30 or horizon_hours != 48.0 or cutoffs != 5 \
                or max_steps is not None or neg_per_pos != 20.0 or until is not None:
            raise _fail("--task churn takes --cases, --as-of, --horizon-days and --seed only")
        _train_churn(dataset, workspace, cases=cases, as_of=as_of, horizon_days=horizon_days, seed=seed)
        return
    if churn_flags:
        raise _fail("--cases, --as-of and --horizon-days apply to --task churn")
    if task != "next-item":
        if model not in (None, "bert") or llm:
            raise _fail(f"--task {task} trains a BERT encoder: use --model bert (and no --llm)")
        if users != 2000 or llm_windows != 30:
            raise _fail("--users and --llm-windows apply to next-item fusion; leave them out with --task click|purchase")
        _train_encoder(dataset, task, workspace, horizon_hours=horizon_hours, cutoffs=cutoffs, seed=seed,
                       max_steps=max_steps, neg_per_pos=neg_per_pos, until=until)
        return
    if model not in (None, "fusion"):
        raise _fail("--model bert trains a click or purchase encoder: add --task click or --task purchase")
    if horizon_hours != 48.0 or cutoffs != 5 or max_steps is not None or neg_per_pos != 20.0 or until is not None:
        raise _fail("--horizon-hours, --cutoffs, --max-steps, --neg-per-pos and --until apply to --task "
                    "click|purchase; add --task, or leave them out to fit next-item fusion weights")
    svc = ShopLensService(_runtime(workspace), use_model=llm)

    def ticker(bar: Any) -> Callable[[int, int], None]:
        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        return tick

    bar = tqdm(desc="validation windows", unit="user")
    try:
        fusion, path = svc.train(dataset, users=users, seed=seed, progress=ticker(bar))
    except ValueError as e:
        raise _fail(str(e)) from e
    finally:
        bar.close()
    m = fusion.metrics
    err.print(f"fitted on {fusion.n_windows} windows; weights {fusion.weights}")
    err.print(f"held-out half ({int(m['n_split_half'])} windows): NDCG@10 default weights "
              f"{m['default_ndcg@10']:.2f} -> fitted {m['fitted_ndcg@10']:.2f}")
    err.print(f"saved {path}")
    if not llm:
        return
    bar = tqdm(desc="model weight: validation windows", unit="window")

    fitted, path = _fit_with_model(
        svc, lambda: svc.train_llm_weight(dataset, windows=llm_windows, seed=seed, progress=ticker(bar)), bar)
    by_w = fitted.metrics["mean_by_weight"]
    assert isinstance(by_w, dict)
    err.print("mean NDCG@10 by model weight: " + ", ".join(f"{w}: {v:.2f}" for w, v in by_w.items()))
    err.print(f"{fitted.verdict()}\nserved weight: {fitted.weight:g}"
              + ("" if fitted.weight else " (the model explains; it does not rank)"))
    err.print(f"saved {path}")


def _fit_with_model(svc: ShopLensService, make: Callable[[], Awaitable[Any]], bar: Any) -> Any:
    """Run a fit that calls the model (`make()`), then stop the embedded model server it started
    and close the progress bar; a ValueError or an unavailable model exits with its message."""
    async def fit() -> Any:
        try:
            return await make()
        finally:
            await svc.runtime.aclose()  # the embedded model server started for the fit

    try:
        return asyncio.run(fit())
    except (ValueError, ModelUnavailableError) as e:
        raise _fail(str(e)) from e
    finally:
        bar.close()


def _train_churn(dataset: str, workspace: Path | None, *, cases: int, as_of: str | None, horizon_days: int,
                 seed: int) -> None:
    """`train --task churn`: progress bar, then the validation comparison and what is served."""
    from tqdm import tqdm

    try:
        when = parse_timestamp(as_of) if as_of is not None else None
    except ValueError as e:
        raise _fail(f"--as-of {as_of!r}: {e}; give an ISO date, e.g. 2011-06-01") from e
    svc = ShopLensService(_runtime(workspace))
    bar = tqdm(desc="churn blend: validation users", unit="user")

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    fitted, path = _fit_with_model(
        svc, lambda: svc.train_churn_blend(dataset, horizon_days=horizon_days, n=cases, seed=seed, as_of=when,
                                           progress=tick), bar)
    for k, v in fitted.metrics["validation"].items():  # 95% bootstrap intervals, paired on the same users
        diff = (f"; vs baseline {v['roc_auc_diff']:+.4f} [{v['roc_auc_diff_ci'][0]:+.4f}, {v['roc_auc_diff_ci'][1]:+.4f}]"
                if "roc_auc_diff" in v else "")
        err.print(f"validation users, {k}: ROC AUC {v['roc_auc']:.4f} [{v['roc_auc_ci'][0]:.4f}, "
                  f"{v['roc_auc_ci'][1]:.4f}], PR AUC {v['pr_auc']:.4f} [{v['pr_auc_ci'][0]:.4f}, "
                  f"{v['pr_auc_ci'][1]:.4f}]{diff}")
    st = fitted.fitted_stack()
    err.print(st.describe())
    err.print("served: " + ("the baseline alone (the model has weight 0)" if st.chosen == "baseline" else
                            f"{st.chosen} (model weight {st.coef.get('llm', 0.0):+.3f} on its log-odds)"))
    err.print(f"saved {path}")


def _train_encoder(dataset: str, task: Literal["click", "purchase"], workspace: Path | None, *, horizon_hours: float,
                   cutoffs: int, seed: int, max_steps: int | None, neg_per_pos: float, until: str | None) -> None:
    """`train --task click|purchase --model bert`: progress bar, then the test users' metrics."""
    from agent.tasks.encoder import FitProgress

    try:
        end = parse_timestamp(until) if until is not None else None
    except ValueError as e:
        raise _fail(f"--until {until!r}: {e}; give an ISO date, e.g. 2017-11-29") from e

    from agent.tasks.encoder_train import encoder_dir

    svc = ShopLensService(_runtime(workspace), use_model=False)
    try:  # the flags checked before any "building cases" line
        cuts = svc.encoder_cutoffs(dataset, horizon_hours=horizon_hours, n_cutoffs=cutoffs, until=end)
    except ValueError as e:
        raise _fail(str(e)) from e
    old = encoder_dir(svc.runtime.settings.index_dir(dataset), task) / "manifest.json"
    if old.exists():
        try:
            was = json.loads(old.read_text(encoding="utf-8")).get("cutoffs") or ["?"]
            err.print(f"note: replaces the {task} encoder in {old.parent} (cut-offs {was[0]} .. {was[-1]}) "
                      "once this one is trained")
        except (OSError, ValueError, AttributeError, IndexError):
            err.print(f"note: replaces the unreadable {task} encoder in {old.parent}")
    err.print(f"building {task} cases at {cutoffs} daily cut-offs {cuts[0]:%Y-%m-%d %H:%M} .. {cuts[-1]:%Y-%m-%d %H:%M} "
              f"UTC ({horizon_hours:g} h horizon)...")
    bar = FitProgress(f"fine-tuning ({task})")
    try:
        fitted, folder = svc.train_encoder(dataset, task, horizon_hours=horizon_hours, n_cutoffs=cutoffs, seed=seed,
                                           max_steps=max_steps, neg_per_pos=neg_per_pos, until=end, progress=bar)
    except ValueError as e:
        raise _fail(str(e)) from e
    finally:
        bar.close()
    man = fitted.manifest
    for split, c in man["cases"].items():
        err.print(f"{split}: {c['n']:,} cases ({c['positives']:,} positive) from {c['users']:,} users")
    h = man["history"]
    err.print(f"fine-tuned {h['steps']} steps in {h['seconds']:.0f} s ({h['stopped']}; best step {h['best_step']})")
    for k, v in man["test_metrics"].items():  # 95% bootstrap intervals; differences paired on the same cases
        diff = (f"; vs baseline {v['roc_auc_diff']:+.4f} [{v['roc_auc_diff_ci'][0]:+.4f}, {v['roc_auc_diff_ci'][1]:+.4f}]"
                if "roc_auc_diff" in v else "")
        err.print(f"test users, {k}: ROC AUC {v['roc_auc']:.4f} [{v['roc_auc_ci'][0]:.4f}, {v['roc_auc_ci'][1]:.4f}], "
                  f"PR AUC {v['pr_auc']:.4f}{diff}")
    err.print(fitted.stack.describe())
    err.print(f"saved {folder}")


@app.command("recommend")
def recommend_cmd(
    dataset: Annotated[str | None, typer.Option(help="an ingested dataset")] = None,
    user: Annotated[str | None, typer.Option(help="user id (in the dataset, or in --events)")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=20, help="how many items")] = 5,
    events: Annotated[Path | None, typer.Option(help="your own events file (.jsonl/.csv/.tsv, optionally .gz), "
                                                "mapped like `shoplens ingest --events`")] = None,
    catalog: Annotated[Path | None, typer.Option(help="your own catalogue (.csv/.jsonl), with --events")] = None,
    map_: MapFlags = None,
    map_file: MapFile = None,
    header: Header = None,
    time_format: TimeFormat = None,
    order_column: OrderColumn = None,
    file_order: FileOrder = False,
    event_type: RowEventType = None,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="retrieval fusion only, no model")] = False,
    repurchase: Annotated[bool, typer.Option(help="allow items the user already bought")] = False,
    permutations: Annotated[int | None, typer.Option(min=1, max=10, help="verbalizer passes "
                                                     "(default: settings, 2)")] = None,
    llm_scorer: Annotated[LlmScorer | None, typer.Option(
        help="how the model scores candidates: verbalizer (letter labels) or pointwise (one "
             "yes/no question per candidate, position-free); default: settings")] = None,
    workspace: Workspace = None,
    data_dir: DataDir = None,
    profile: Profile = None,
) -> None:
    """Predict a user's next k items (JSON on stdout).

    Retrieval candidates scored by the model and fused with the retrieval scores; each item has
    a reason citing the user's events. --events/--catalog use your own files, read with the
    mapping flags of `shoplens ingest` and stored under a content-addressed dataset name
    (file-<hash>); for more than one request, `shoplens ingest --events FILE --name NAME` once and
    --dataset NAME after. The configuration is the one the API and the chat use (settings), with
    these flags on top.
    """
    if (dataset is None) == (events is None):
        raise _fail("give either --dataset (with --user) or --events (with optional --catalog)")
    mapping = (map_, map_file, header, time_format, order_column, file_order or None, event_type, catalog)
    if events is None and any(x is not None for x in mapping):
        raise _fail("--catalog and the mapping flags (--map, --map-file, --header, --time-format, "
                    "--order-column, --file-order, --event-type) go with --events")
    rt = _runtime(workspace, data_dir, profile)
    if events is not None:
        try:
            cmap = build_column_map(map_ or [], map_file, header=header.split(",") if header else None,
                                    time_format=time_format, order_column=order_column, file_order=file_order,
                                    event_type=event_type)
            dataset, user = _ingest_file(rt, events, catalog, user, cmap)
        except NoValidEventsError as e:
            err.print(e.report.summary(), markup=False, highlight=False, soft_wrap=True)
            raise _fail(str(e)) from e
        except (ValueError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    elif user is None:
        raise _fail("--user is required with --dataset")
    assert dataset is not None and user is not None
    base = ShopLensService(rt, use_model=not no_llm).next_item_config(k=k, repurchase=repurchase,
                                                                      use_model=not no_llm)
    cfg = replace(base, permutations=permutations or base.permutations,
                  llm_scorer=llm_scorer or base.llm_scorer)
    try:
        pred = asyncio.run(_predict(rt, dataset, user, cfg, use_model=not no_llm))
    except CallerError as e:  # unknown dataset or user, inline events of other users
        raise _fail(str(e)) from e
    note_degraded(pred.meta)
    templated = sum(it.reason_source != "model" for it in pred.items)
    if templated and not pred.meta.degraded:  # --no-llm, or a cold start: not degraded, still said
        why = "--no-llm: ranked by retrieval fusion" if no_llm else "; ".join(pred.meta.notes[:1]) or "no model reasons"
        typer.echo(f"note: template reasons for {templated} of {len(pred.items)} items ({why})", err=True)
    print(prediction_json(pred))


def _ingest_file(rt: Runtime, events: Path, catalog: Path | None, user: str | None,
                 mapping: ColumnMap) -> tuple[str, str]:
    """Store a user's own files under a content-addressed dataset name (the files' bytes and the
    mapping: another mapping of the same file is another dataset); return (dataset, user).

    Raises:
        NoValidEventsError: every row was dropped (carries the load report).
        ValueError: more than one user in the file and no `user`.
    """
    h = hashlib.sha256(events.read_bytes() + (catalog.read_bytes() if catalog else b"")
                       + mapping.model_dump_json(exclude_defaults=True).encode()).hexdigest()[:10]
    name = f"file-{h}"
    report = rt.ingest_file(name, events, mapping=mapping, catalog=catalog, rebuild_index=False,
                            show_progress=False)
    err.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    users = rt.store.user_ids(name)
    if user is None:
        if len(users) > 1:
            raise ValueError(f"{events} holds {len(users)} users; pick one with --user (e.g. {users[0]})")
        user = users[0]
    return name, user


async def _predict(rt: Runtime, dataset: str, user: str, cfg: NextItemConfig, *, use_model: bool) -> NextItemPrediction:
    try:
        return await ShopLensService(rt, use_model=use_model).next_item(dataset, user, config=cfg)
    finally:
        await rt.aclose()


@app.command("demo")
def demo_cmd(
    users: Annotated[list[str] | None, typer.Option("--user", help="customer ids (default: 3 real ones)")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=10)] = 5,
    workspace: Workspace = None,
    data_dir: DataDir = None,
    profile: Profile = None,
) -> None:
    """Explain next items for real Online Retail customers.

    Ingests UCI Online Retail on first use, starts the embedded model and prints a table per
    customer: items, fused scores, reasons with the cited events, and the model's cost.
    """
    rt = _runtime(workspace, data_dir, profile)
    dataset = "online-retail"
    try:
        report = rt.ensure_ingested(dataset)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    if report is not None:
        err.print(report.summary())
    asyncio.run(_demo(rt, dataset, list(users or DEMO_USERS[:2]), k))


async def _demo(rt: Runtime, dataset: str, users: list[str], k: int) -> None:
    """The demo goes through the one facade (`ShopLensService.next_item`), as the API does."""
    try:
        t0 = time.perf_counter()
        err.print("starting the model ...")
        try:
            model = await rt.model()
            err.print(f"model {model.model_id} ready in {time.perf_counter() - t0:.1f} s")
        except ModelUnavailableError as e:
            err.print(f"[yellow]model unavailable ({e}); showing retrieval-only answers[/]")
        service = ShopLensService(rt)
        for uid in users:
            try:
                pred = await service.next_item(dataset, uid, config=service.next_item_config(k=k))
            except UnknownUserError as e:
                err.print(f"[red]{e}[/]")
                continue
            render_prediction(pred, len(rt.store.user_events(dataset, uid)))  # a count, shown only
    finally:
        await rt.aclose()


def render_prediction(pred: NextItemPrediction, n_events: int) -> None:
    """Print one prediction as a rich table plus the intent summary and meta line."""
    m = pred.meta
    table = Table(title=f"Customer {pred.user_id}: next {pred.k} items ({n_events} past events)",
                  show_lines=True, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    table.add_column("reason (cited events)")
    for it in pred.items:
        cites = "; ".join(f"{e.ref}: {e.summary}" for e in it.evidence)
        src = "" if it.reason_source == "model" else " [dim](fallback)[/]"
        table.add_row(str(it.rank), f"{it.title}\n[dim]{it.item_id}[/]", f"{it.score:.3f}",
                      f"{it.reason}{src}\n[dim]{cites}[/]")
    out.print(table)
    out.print(f"[bold]Intent:[/] {pred.intent_summary}")
    out.print(
        f"[dim]model {m.model_id or 'none'} · prompts {', '.join(m.prompt_versions) or '-'} · "
        f"{m.attempts} model calls · {m.prompt_tokens}+{m.completion_tokens} tokens · "
        f"{m.latency_s:.1f} s total ({m.model_latency_s:.1f} s in the model)"
        + (f" · [yellow]degraded: {m.degraded_reason}[/]" if m.degraded else "") + "[/]\n"
    )


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="mount the merchandiser chat at /ui")] = True,
    workspace: Workspace = None,
    profile: Profile = None,
) -> None:
    """Serve the JSON API (and the chat at /ui).

    Uses the embedded model unless SHOPLENS_LLM_BASE_URL points at a server; routes and
    examples are in docs/api.md.
    """
    from pydantic import ValidationError

    from ui.api import ApiSettings, serve

    try:
        api = ApiSettings()
    except ValidationError as e:  # e.g. a key entry with an unknown scope, named by its position
        raise _fail("; ".join(x["msg"].removeprefix("Value error, ") for x in e.errors())) from None
    serve(host, port, load_settings(workspace=workspace, llm_profile=profile), api, with_ui=ui)


@app.command("ui")
def ui_cmd(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 7860,
    workspace: Workspace = None,
    profile: Profile = None,
) -> None:
    """The merchandiser chat alone (Gradio).

    `shoplens serve` mounts the same chat at /ui beside the API.
    """
    from ui.chat import launch

    launch(host, port, load_settings(workspace=workspace, llm_profile=profile))


@app.command("schema")
def schema_cmd() -> None:
    """Print the JSON schema of a next-item answer."""
    print(json.dumps(NextItemPrediction.model_json_schema(), indent=2))


# ---- the other command modules, and an example on every command's --help ---------------------

app.add_typer(eval_app, name="eval", help="Offline evaluation, rescore and compare.",
              epilog=examples_epilog(list(EVAL_EXAMPLES.values()), "Examples"))
sentiment_cli.register(app)
tasks_cli.register(app)
precompute_cli.register(app)
serve_llm_cli.register(app)
eval_app.command("sentiment")(sentiment_cli.eval_sentiment_cmd)
eval_app.command("aspects")(sentiment_cli.eval_aspects_cmd)
eval_app.command("sentiment-transfer")(sentiment_cli.eval_sentiment_transfer_cmd)
eval_app.command("intent")(tasks_cli.eval_intent_cmd)
eval_app.command("churn")(tasks_cli.eval_churn_cmd)
eval_app.command("audience")(tasks_cli.eval_audience_cmd)
for _typer, _examples in ((app, COMMANDS), (eval_app, EVAL_EXAMPLES)):
    for _info in _typer.registered_commands:
        _name = _info.name or (_info.callback.__name__ if _info.callback else "")
        if _info.epilog is None and _name in _examples:
            _info.epilog = examples_epilog([_examples[_name]])


def cli() -> None:
    """The ``shoplens`` console script: the Typer app, with an event store that cannot be opened
    (a wrong SHOPLENS_DATABASE_URL, an unreachable server, a wrong password) said in one line,
    exit code 2, instead of a traceback."""
    try:
        app()
    except StoreConfigError as e:
        sys.exit(_fail(str(e)).exit_code)  # printed as every command's errors are


if __name__ == "__main__":
    cli()
