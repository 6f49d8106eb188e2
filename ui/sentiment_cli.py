"""`shoplens sentiment` and `shoplens eval sentiment` (thin: flags in, agent/ and eval/ called).

    shoplens sentiment --text "质量很好，物流也快" --text "Arrived broken, support never answered"
    shoplens sentiment --file reviews.csv --column review --out scored.csv
    shoplens sentiment --dataset amazon-beauty --by item --window 90d
    shoplens eval sentiment --set zh --n 300 --ranker llm

Mount with ``register(app)`` (adds ``sentiment``) and
``eval_app.command("sentiment")(eval_sentiment_cmd)``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from tqdm import tqdm

from agent.app.results import SentimentBatchMeta
from agent.tasks.opinion import GroupTrend, sentiment_trends
from agent.tasks.sentiment import SentimentFailure, SentimentResult
from ui.options import Profile, Workspace, note_degraded

# eval.sentiment_eval.SETS / RANKERS and eval.aspect_eval.RANKERS (tests/test_cli_help.py keeps them equal)
SentimentSet = Literal["zh", "amazon_cells", "laptops", "beauty", "hostile"]
SentimentRanker = Literal["llm", "tfidf", "lexicon"]
AspectsRanker = Literal["llm", "train-lexicon"]


def register(app: typer.Typer) -> None:
    """Add the ``sentiment`` command to `app`."""
    app.command("sentiment")(sentiment_cmd)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def parse_window(s: str) -> int:
    """'90d', '12w', '90' -> days.

    Raises:
        ValueError: anything else.
    """
    m = re.fullmatch(r"\s*(\d+)\s*([dw]?)\s*", s.lower())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"window must look like 90d, 12w or 90 (days); got {s!r}")
    return int(m.group(1)) * (7 if m.group(2) == "w" else 1)


def sentiment_cmd(
    text: Annotated[list[str] | None, typer.Option("--text", help="a review to judge (repeatable)")] = None,
    file: Annotated[Path | None, typer.Option(help="CSV file of reviews to score")] = None,
    column: Annotated[str, typer.Option(help="review column in --file")] = "review",
    out: Annotated[Path | None, typer.Option(help="scored CSV to write (default: <file>.scored.csv)")] = None,
    dataset: Annotated[str | None, typer.Option(help="an ingested dataset: per-group sentiment trends")] = None,
    by: Annotated[Literal["item", "user"], typer.Option(help="trends grouped by item or by user")] = "item",
    window: Annotated[str, typer.Option(help="trend window, e.g. 90d or 12w")] = "90d",
    min_count: Annotated[int, typer.Option(help="reviews needed in each of the last two windows")] = 5,
    turn_pts: Annotated[float, typer.Option(help="negative-share change (points) that flags a turn")] = 20.0,
    top: Annotated[int, typer.Option(help="trend rows to show")] = 20,
    aspects: Annotated[bool | None, typer.Option("--aspects/--no-aspects",
                                                 help="aspect sentiment (default: on for --text, off for --file)")] = None,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="lexicon baseline only (labelled degraded)")] = False,
    workspace: Workspace = None,
    profile: Profile = None,
    as_json: Annotated[bool, typer.Option("--json", help="trends as JSON")] = False,
) -> None:
    """Review sentiment and aspects; batch CSV; opinion trends.

    --text: polarity, confidence, language and aspects per review (JSON). --file: a CSV scored
    into a new CSV, with a progress bar. --dataset: per-item (or per-user) negative-share trends
    over time windows, with turned groups flagged.
    """
    modes = sum(x is not None and x != [] for x in (text, file, dataset))
    if modes != 1:
        raise _fail("give exactly one of --text, --file or --dataset")
    from agent.app.runtime import Runtime
    from agent.settings import load_settings

    rt = Runtime(load_settings(workspace=workspace, llm_profile=profile))
    if dataset is not None:
        try:
            days = parse_window(window)
        except ValueError as e:
            raise _fail(str(e)) from e
        if not rt.store.counts(dataset)["events"]:
            raise _fail(f"no events for dataset {dataset!r}; load it first: `shoplens ingest {dataset}` (a built-in) "
                        f"or `shoplens ingest --events FILE --name {dataset}` (your own export)")
        trends = sentiment_trends(rt.store, dataset, by=by, window_days=days, min_count=min_count,
                                  turn_pts=turn_pts)
        if not trends and next(rt.store.iter_events(dataset, event_types=("review",)), None) is None:
            typer.echo(f"note: dataset {dataset!r} has no review events: trends read events of type review (their "
                       "rating, else their text); ingest review rows with --map COLUMN=event_type or "
                       "--event-type review", err=True)
        if as_json:
            typer.echo(json.dumps([t.as_dict() for t in trends[:top]], indent=2, ensure_ascii=False))
        else:
            typer.echo(render_trends(trends[:top], days, len(trends)))
        return
    try:
        asyncio.run(_score(rt, text, file, column, out, aspects, no_llm))
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise _fail(str(e)) from e


async def _score(rt: Any, texts: list[str] | None, file: Path | None, column: str, out: Path | None,
                 aspects: bool | None, no_llm: bool) -> None:
    from agent.app.service import ShopLensService

    svc = ShopLensService(rt, use_model=not no_llm)
    try:
        if texts:
            batch = await svc.sentiment(texts, aspects=True if aspects is None else aspects)
            _warn_degraded(batch.meta)
            typer.echo(json.dumps([r.model_dump(mode="json") for r in batch.results], indent=2, ensure_ascii=False))
            return
        assert file is not None
        rows, fields = read_rows(file, column)
        bar = tqdm(total=len(rows), desc="sentiment", unit="review", file=sys.stderr)
        batch = await svc.sentiment([r.get(column) for r in rows], aspects=bool(aspects),
                                    on_done=lambda i, r: bar.update(1), deadline_s=None)  # a file: no overall deadline
        bar.close()
        _warn_degraded(batch.meta)
        out = out or file.with_suffix(".scored.csv")
        summary = write_scored(out, rows, fields, batch.results)
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    finally:
        await rt.aclose()


def _warn_degraded(meta: SentimentBatchMeta) -> None:
    """One stderr line when any text was judged by the lexicon fallback (--no-llm included)."""
    note_degraded(meta, f"answer for {meta.by_lexicon} of {meta.n} texts")


def read_rows(path: Path, column: str) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a CSV (utf-8, BOM tolerated).

    Raises:
        FileNotFoundError: no file.
        KeyError: `column` is not in the header (lists the header).
    """
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        if column not in fields:
            raise KeyError(f"column {column!r} not in {path.name}; columns: {', '.join(fields)}")
        return list(reader), fields


def write_scored(out: Path, rows: list[dict[str, str]], fields: list[str],
                 results: list[SentimentResult | SentimentFailure]) -> dict[str, Any]:
    """Write rows + polarity/confidence/language/source/aspects/error columns; return a summary."""
    extra = ["polarity", "confidence", "language", "source", "aspects", "error"]
    counts: dict[str, int] = {}
    bad: list[dict[str, Any]] = []
    with out.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + [x for x in extra if x not in fields])
        w.writeheader()
        for i, (row, r) in enumerate(zip(rows, results, strict=True)):
            if isinstance(r, SentimentFailure):
                bad.append({"row": i + 2, "error": r.error})  # +2: header line, 1-based
                w.writerow({**row, "error": r.error})
                continue
            counts[r.polarity] = counts.get(r.polarity, 0) + 1
            w.writerow({**row, "polarity": r.polarity, "confidence": f"{r.confidence:.4f}", "language": r.language,
                        "source": r.source, "aspects": json.dumps([a.model_dump() for a in r.aspects], ensure_ascii=False),
                        "error": ""})
    degraded = sum(1 for r in results if isinstance(r, SentimentResult) and r.meta.degraded)
    return {"out": str(out), "rows": len(rows), "scored": len(rows) - len(bad), "polarity_counts": counts,
            "degraded": degraded, "bad_rows": bad}


def render_trends(trends: list[GroupTrend], window_days: int, total: int) -> str:
    """A plain-text table: one row per group, negative share per window (oldest first)."""
    if not trends:
        return "no reviews in the reported windows"
    lines = [f"{total} groups with reviews; windows of {window_days} days, oldest first "
             "(cell: % negative / n reviews)", ""]
    hdr = f"{'key':<14} {'n':>5}  " + "  ".join(f"{'w' + str(i + 1):>9}" for i in range(len(trends[0].windows)))
    lines += [hdr + "  turned", "-" * (len(hdr) + 30)]
    for t in trends:
        cells = "  ".join(f"{(f'{100 * w.share_negative:.0f}%/{w.n}' if w.n else '-'):>9}" for w in t.windows)
        flag = f"{t.turned.upper()}: {t.reason}" if t.turned else ""
        lines.append(f"{t.key:<14} {t.n_reviews:>5}  {cells}  {flag}")
    return "\n".join(lines)


def eval_sentiment_cmd(
    set_: Annotated[SentimentSet, typer.Option("--set", help="review set")] = "zh",
    n: Annotated[int, typer.Option(help="test cases")] = 300,
    ranker: Annotated[SentimentRanker, typer.Option(help="the model, or a baseline")] = "llm",
    seed: Annotated[int, typer.Option(help="sampling/split seed")] = 2024,
    max_chars: Annotated[int, typer.Option(help="reviews cut to this many characters")] = 600,
    profile: Profile = None,
    out: Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")] = None,
) -> None:
    """Review sentiment on one labelled set: accuracy, macro-F1, ECE.

    Writes a run folder (config, cases, metrics, report with confusion and calibration plots).
    """
    from eval.sentiment_eval import SentimentRunConfig, run_sentiment

    try:
        run_dir = run_sentiment(SentimentRunConfig(set=set_, n=n, ranker=ranker, seed=seed, max_chars=max_chars,
                                                   profile=profile, out=out))
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    typer.echo(str(run_dir))
    typer.echo((run_dir / "metrics.json").read_text())


def eval_aspects_cmd(
    n: Annotated[int, typer.Option(help="test sentences (0: all 418)")] = 60,
    ranker: Annotated[AspectsRanker, typer.Option(help="the model, or SemEval-2014's train lexicon")] = "llm",
    seed: Annotated[int, typer.Option(help="sampling seed")] = 2024,
    profile: Profile = None,
    out: Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")] = None,
) -> None:
    """Aspect extraction on SemEval-2014 laptops: term and joint F1.

    Joint F1 counts an aspect right when both its term and its polarity match the gold.
    """
    from eval.aspect_eval import run_aspect_eval

    try:
        run_dir = run_aspect_eval(n, ranker=ranker, seed=seed, profile=profile, out=out)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    typer.echo(str(run_dir))
    typer.echo((run_dir / "metrics.json").read_text())
