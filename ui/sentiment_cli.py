"""`shoplens sentiment` and `shoplens eval sentiment` (thin: flags in, agent/ and eval/ called).

    shoplens sentiment --text "质量很好，物流也快" --text "Arrived broken, support never answered"
    shoplens sentiment --file reviews.csv --column review --out scored.csv
    shoplens sentiment --file reviews.csv --aspects --one-call     # aspects at ~7x the speed
    shoplens sentiment --file reviews.csv --base-url http://gpu:8000/v1 --concurrency 16
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
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from tqdm import tqdm

from agent.app.results import SentimentBatch, SentimentBatchMeta
from agent.app.sentiment_scores import REUSED_NOTE
from agent.tasks.opinion import GroupTrend, trends_from_events
from agent.tasks.sentiment import (
    Polarity,
    SentimentConfig,
    SentimentFailure,
    SentimentResult,
    lexicon_polarity,
)
from ui.options import Profile, Workspace, note_degraded

# eval.sentiment_eval.SETS / RANKERS and eval.aspect_eval.RANKERS (tests/test_cli_help.py keeps them equal)
SentimentSet = Literal["zh", "amazon_cells", "laptops", "beauty", "hostile"]
SentimentRanker = Literal["llm", "tfidf", "lexicon", "bert"]
AspectsRanker = Literal["llm", "train-lexicon"]
TransferLang = Literal["zh", "en"]


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
    one_call: Annotated[bool, typer.Option(
        "--one-call", help="aspects in the polarity call: ~7x the reviews/min, a less accurate label "
        "(docs/sentiment_results.md)")] = False,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="lexicon baseline only (labelled degraded)")] = False,
    base_url: Annotated[str | None, typer.Option(
        help="an OpenAI-compatible model server (vLLM) instead of the embedded model")] = None,
    concurrency: Annotated[int, typer.Option(
        min=1, help="model requests in flight (1 suits the embedded 2-core model; a vLLM server takes 16+)")] = 1,
    store: Annotated[bool, typer.Option(
        "--store/--no-store", help="reuse and keep scores in <workspace>/sentiment_scores.sqlite3 (a re-run "
        "scores only new reviews; an interrupted run resumes)")] = True,
    workspace: Workspace = None,
    profile: Profile = None,
    as_json: Annotated[bool, typer.Option("--json", help="trends as JSON")] = False,
    demos: Annotated[Path | None, typer.Option(
        help="your shop's labelled reviews (CSV or JSONL): each review is judged after its 4 nearest "
             "(2 per label) as demonstrations (few-shot; docs/sentiment_results.md)")] = None,
    demo_text_column: Annotated[str, typer.Option(help="review column in --demos")] = "review",
    demo_label_column: Annotated[str, typer.Option(
        help="label column in --demos: positive/negative/neutral, 1/0 or 正面/负面/中性")] = "label",
    fit_offset: Annotated[int, typer.Option(
        min=0, help="score this many --demos reviews (each without itself) and fit the shop's decision "
                    "offset on them (0: none)")] = 0,
) -> None:
    """Review sentiment and aspects; batch CSV; opinion trends.

    --text: polarity, confidence, language and aspects per review (JSON). --file: a CSV scored
    into a new CSV (progress with rate and ETA; stored scores reused, so a re-run scores only new
    rows), then a summary: counts per polarity, top aspects, failed rows. --dataset: per-item (or
    per-user) negative-share trends over time windows, with turned groups flagged; reviews without
    a rating are scored by the model (stored: only new ones are scored) and each group's top
    aspects in the last window are listed.
    """
    modes = sum(x is not None and x != [] for x in (text, file, dataset))
    if modes != 1:
        raise _fail("give exactly one of --text, --file or --dataset")
    from agent.app.runtime import Runtime
    from agent.settings import load_settings

    overrides: dict[str, Any] = {"llm_base_url": base_url}
    if concurrency > 1:  # the model guard's own cap must let that many requests through
        overrides["model_max_concurrency"] = concurrency
    rt = Runtime(load_settings(workspace=workspace, llm_profile=profile, **overrides))
    if fit_offset and demos is None:
        raise _fail("--fit-offset needs --demos (the labelled reviews to fit it on)")
    if demos is not None:
        if no_llm:
            raise _fail("--demos are demonstrations for the model; drop --no-llm (the lexicon uses none)")
        from agent.tasks.sentiment.fewshot import read_labelled
        try:  # a bad file fails here, before any model or embedder starts
            read_labelled(demos, text_column=demo_text_column, label_column=demo_label_column)
        except (ValueError, FileNotFoundError) as e:
            raise _fail(str(e)) from e
    opts = _ScoreOptions(aspects=aspects if aspects is not None else text is not None, no_llm=no_llm,
                         concurrency=concurrency, store=store, one_call=one_call, demos=demos,
                         demo_columns=(demo_text_column, demo_label_column), fit_offset=fit_offset)
    if dataset is not None:
        try:
            days = parse_window(window)
        except ValueError as e:
            raise _fail(str(e)) from e
        if not rt.store.counts(dataset)["events"]:
            raise _fail(f"no events for dataset {dataset!r}; load it first: `shoplens ingest {dataset}` (a built-in) "
                        f"or `shoplens ingest --events FILE --name {dataset}` (your own export)")
        trends = asyncio.run(_dataset_trends(rt, dataset, by, days, min_count, turn_pts, opts))
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
        asyncio.run(_score(rt, text, file, column, out, opts))
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise _fail(str(e)) from e


@dataclass
class _ScoreOptions:
    aspects: bool
    no_llm: bool
    concurrency: int
    store: bool
    one_call: bool = False
    demos: Path | None = None
    demo_columns: tuple[str, str] = ("review", "label")
    fit_offset: int = 0
    label_offset: float = 0.0  # set by `_shop_fewshot` once fitted
    pool: Any = None  # the shop's DemoPool, set by `_shop_fewshot`
    embedder: Any = None

    @property
    def config(self) -> SentimentConfig:
        return SentimentConfig(joint=self.one_call, label_offset=self.label_offset)


async def _shop_fewshot(rt: Any, opts: _ScoreOptions) -> None:
    """With --demos: load (or build and keep, under <workspace>/sentiment_pools/<sha>) the shop's
    demonstration pool; with --fit-offset N, judge N of its reviews few-shot (each without itself)
    and fit the decision offset on their labels. Fills `opts.pool`, `opts.embedder`, `opts.label_offset`."""
    import hashlib
    import random

    from agent.app.service import ShopLensService
    from agent.tasks.sentiment.fewshot import DemoPool, fit_offset, log_odds, read_labelled
    from retrieval.embedder import E5Embedder

    if opts.demos is None or opts.no_llm:
        return
    labelled = read_labelled(opts.demos, text_column=opts.demo_columns[0], label_column=opts.demo_columns[1],
                             domain="shop")
    sha = hashlib.sha256(opts.demos.read_bytes() + "\x1e".join(opts.demo_columns).encode()).hexdigest()[:16]
    folder = rt.settings.workspace / "sentiment_pools" / sha
    opts.embedder = E5Embedder()
    if (folder / "manifest.json").exists():
        opts.pool = DemoPool.load(folder)
    else:
        typer.echo(f"embedding {len(labelled)} labelled reviews (multilingual E5) into {folder}", err=True)
        opts.pool = DemoPool.build(labelled, opts.embedder)
        opts.pool.save(folder)
    if not opts.fit_offset:
        return
    pos = [d for d in labelled if d.label == "positive"]
    neg = [d for d in labelled if d.label == "negative"]
    if min(len(pos), len(neg)) < 2 or opts.fit_offset < 4:
        raise ValueError(f"--fit-offset {opts.fit_offset}: an offset needs at least 4 labelled reviews, 2 positive and "
                         f"2 negative; --demos has {len(pos)} positive and {len(neg)} negative")
    rng = random.Random(0)  # half of each label (as far as the file has them): the offset sees both sides
    n_pos = min(len(pos), max(opts.fit_offset // 2, opts.fit_offset - len(neg)))
    pick = rng.sample(pos, n_pos) + rng.sample(neg, min(len(neg), opts.fit_offset - n_pos))
    batch = await ShopLensService(rt).sentiment([d.text for d in pick], deadline_s=None, config=opts.config,
                                                demos=opts.pool, embedder=opts.embedder)
    ok = [(r, d) for r, d in zip(batch.results, pick, strict=True)
          if isinstance(r, SentimentResult) and r.source == "model"]
    if len(ok) < 4:
        raise ValueError(f"--fit-offset: only {len(ok)} of {len(pick)} labelled reviews got a model answer; "
                         "at least 4 are needed (is the model up?)")
    opts.label_offset = fit_offset([log_odds(r.probabilities) for r, _ in ok],
                                   [int(d.label == "positive") for _, d in ok])
    typer.echo(f"decision offset {opts.label_offset:+.2f} fitted on {len(ok)} labelled reviews", err=True)


async def _score_texts(rt: Any, texts: list[Any], opts: _ScoreOptions, desc: str) -> SentimentBatch:
    """Score `texts` as a batch job: stored scores first, then the model; progress with rate and
    ETA on stderr; no overall deadline (each model call is still bounded by the guard)."""
    from agent.app.sentiment_scores import FILE_NAME, SentimentScoreStore
    from agent.app.service import ShopLensService

    svc = ShopLensService(rt, use_model=not opts.no_llm)
    scores = SentimentScoreStore(rt.settings.workspace / FILE_NAME) if opts.store and not opts.no_llm else None
    bar = tqdm(total=len(texts), desc=desc, unit="review", file=sys.stderr, smoothing=0.1)
    reused = 0

    def tick(i: int, r: SentimentResult | SentimentFailure) -> None:
        nonlocal reused
        if isinstance(r, SentimentResult) and REUSED_NOTE in r.meta.notes:
            reused += 1
            bar.set_postfix(stored=reused, refresh=False)
        bar.update(1)

    try:
        return await svc.sentiment(texts, aspects=opts.aspects, on_done=tick, deadline_s=None, scores=scores,
                                   concurrency=opts.concurrency, config=opts.config, demos=opts.pool,
                                   embedder=opts.embedder)
    finally:
        bar.close()
        if scores is not None:
            scores.close()


async def _score(rt: Any, texts: list[str] | None, file: Path | None, column: str, out: Path | None,
                 opts: _ScoreOptions) -> None:
    from agent.app.service import ShopLensService

    try:
        await _shop_fewshot(rt, opts)
        if texts:
            batch = await ShopLensService(rt, use_model=not opts.no_llm).sentiment(
                texts, aspects=opts.aspects, config=opts.config, demos=opts.pool, embedder=opts.embedder)
            _warn_degraded(batch.meta)
            typer.echo(json.dumps([r.model_dump(mode="json") for r in batch.results], indent=2, ensure_ascii=False))
            return
        assert file is not None
        rows, fields = read_rows(file, column)
        t0 = time.perf_counter()
        batch = await _score_texts(rt, [r.get(column) for r in rows], opts, "sentiment")
        _warn_degraded(batch.meta)
        out = out or file.with_suffix(".scored.csv")
        summary = write_scored(out, rows, fields, batch.results)
        seconds = time.perf_counter() - t0
        summary.update(reused_stored=batch.meta.reused, scored_now=batch.meta.n - batch.meta.reused,
                       seconds=round(seconds, 1),
                       reviews_per_minute=round(60 * batch.meta.n / seconds, 1) if seconds > 0 else None)
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    finally:
        await rt.aclose()


async def _dataset_trends(rt: Any, dataset: str, by: Literal["item", "user"], days: int, min_count: int,
                          turn_pts: float, opts: _ScoreOptions, n_windows: int = 4) -> list[GroupTrend]:
    """Trends over the reported windows: ratings where given, else the model's (stored) polarity;
    with aspects, each group's top aspects in the last window (from every review text there)."""
    reviews = list(rt.store.iter_events(dataset, event_types=("review",)))
    if not reviews:
        return []
    end = max(e.timestamp for e in reviews)
    start = end - timedelta(days=days * n_windows)
    in_windows = [e for e in reviews if start < e.timestamp <= end and e.review_text and e.review_text.strip()]
    need = [e for e in in_windows if e.rating is None or opts.aspects]
    by_text: dict[str, SentimentResult] = {}
    if need and not opts.no_llm:
        await _shop_fewshot(rt, opts)
        texts = list(dict.fromkeys(e.review_text for e in need if e.review_text))
        try:
            batch = await _score_texts(rt, texts, opts, f"reviews of {dataset}")
        finally:
            await rt.aclose()
        _warn_degraded(batch.meta)
        by_text = {t: r for t, r in zip(texts, batch.results, strict=True) if isinstance(r, SentimentResult)}
        typer.echo(f"note: {len(texts)} review texts in the windows: {batch.meta.reused} from stored scores, "
                   f"{len(texts) - batch.meta.reused} scored now", err=True)

    def scorer(text: str) -> Polarity:
        r = by_text.get(text)
        return r.polarity if r is not None else lexicon_polarity(text)

    trends = trends_from_events(reviews, by=by, window_days=days, min_count=min_count, turn_pts=turn_pts,
                                n_windows=n_windows, scorer=scorer)  # the reviews read above, not a second pass
    if opts.aspects and by_text:
        last_start = end - timedelta(days=days)
        per_group: dict[str, Counter[tuple[str, str]]] = {}
        for e in in_windows:
            r = by_text.get(e.review_text or "")
            if r is None or e.timestamp <= last_start:
                continue
            c = per_group.setdefault(e.item_id if by == "item" else e.user_id, Counter())
            c.update((a.aspect.lower(), a.polarity) for a in r.aspects)
        for t in trends:
            if t.key in per_group:
                t.extra["top_aspects_last_window"] = [
                    {"aspect": a, "polarity": p, "n": n} for (a, p), n in per_group[t.key].most_common(5)]
    return trends


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
    """Write rows + polarity/confidence/language/source/aspects/error columns; return a summary:
    counts per polarity, the 10 most frequent aspect terms (lower-cased) with their polarity
    counts, and the failed rows by their line number in the file (header = line 1)."""
    extra = ["polarity", "confidence", "language", "source", "aspects", "error"]
    counts: dict[str, int] = {}
    aspect_counts: dict[str, Counter[str]] = {}
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
            for a in r.aspects:
                aspect_counts.setdefault(a.aspect.lower(), Counter())[a.polarity] += 1
            w.writerow({**row, "polarity": r.polarity, "confidence": f"{r.confidence:.4f}", "language": r.language,
                        "source": r.source, "aspects": json.dumps([a.model_dump() for a in r.aspects], ensure_ascii=False),
                        "error": ""})
    degraded = sum(1 for r in results if isinstance(r, SentimentResult) and r.meta.degraded)
    top = sorted(aspect_counts.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:10]
    return {"out": str(out), "rows": len(rows), "scored": len(rows) - len(bad), "polarity_counts": counts,
            "top_aspects": [{"aspect": a, "n": sum(c.values()), **dict(sorted(c.items()))} for a, c in top],
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
        tops = t.extra.get("top_aspects_last_window")
        if tops:
            sign = {"positive": "+", "negative": "-", "neutral": "~"}
            lines.append(" " * 16 + "last window's aspects: " + ", ".join(
                f"{a['aspect']} {sign[a['polarity']]}{a['n']}" for a in tops))
    return "\n".join(lines)


def eval_sentiment_cmd(
    set_: Annotated[SentimentSet, typer.Option("--set", help="review set")] = "zh",
    n: Annotated[int, typer.Option(help="test cases")] = 300,
    ranker: Annotated[SentimentRanker, typer.Option(help="the model, or a baseline")] = "llm",
    seed: Annotated[int, typer.Option(help="sampling/split seed")] = 2024,
    max_chars: Annotated[int, typer.Option(help="reviews cut to this many characters")] = 600,
    aspects: Annotated[bool, typer.Option(
        "--aspects", help="the one-call path: polarity with aspect lines after it (sentiment_joint.v2)")] = False,
    profile: Profile = None,
    out: Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")] = None,
    train_on: Annotated[list[str] | None, typer.Option(  # typer lists take no Literal; checked by the eval
        help="bert: learn from this other English set only: amazon_cells, laptops or beauty "
             "(repeatable; cross-domain)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="bert: fine-tuning steps at most (default 300)")] = None,
    max_len: Annotated[int | None, typer.Option(help="bert: word pieces per review (default 128)")] = None,
) -> None:
    """Review sentiment on one labelled set: accuracy, macro-F1, ECE.

    Writes a run folder (config, cases, metrics, report with confusion and calibration plots).
    """
    from eval.sentiment_eval import SentimentRunConfig, encoder_config, run_sentiment

    try:
        run_dir = run_sentiment(SentimentRunConfig(set=set_, n=n, ranker=ranker, seed=seed, max_chars=max_chars,
                                                   aspects=aspects, profile=profile, out=out,
                                                   train_on=tuple(train_on or ()),
                                                   encoder=encoder_config(max_steps, max_len)))
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    typer.echo(str(run_dir))
    typer.echo((run_dir / "metrics.json").read_text())


def eval_sentiment_transfer_cmd(
    lang: Annotated[TransferLang, typer.Option(help="zh: the ten categories of the Chinese shopping set; en: "
                                                    "amazon_cells, beauty, laptops (+ the sarcasm slice)")] = "zh",
    per_domain: Annotated[int, typer.Option(help="test reviews per held-out domain (balanced by label)")] = 30,
    shots: Annotated[int, typer.Option(help="demonstrations per review (nearest of each label, other domains)")] = 4,
    pool_per_domain: Annotated[int, typer.Option(help="labelled reviews per domain in the demonstration pool")] = 60,
    threshold_k: Annotated[int, typer.Option(help="labelled reviews of the domain per fitted decision offset")] = 16,
    rankers: Annotated[str, typer.Option(help="model rankers, comma-separated: zero, instr, fewshot "
                                              "(TF-IDF baselines always run)")] = "zero,instr,fewshot",
    domains: Annotated[str, typer.Option(help="only these domains, comma-separated (default: all)")] = "",
    seed: Annotated[int, typer.Option(help="sampling seed")] = 2024,
    profile: Profile = None,
    out: Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="recompute the report of --out from its "
                                                                    "cases.jsonl, no model")] = False,
) -> None:
    """Sentiment on shops the model never saw: leave-one-domain-out, zero-shot vs few-shot vs TF-IDF.

    Each held-out domain is judged with no label of its own: demonstrations come from the other
    domains, TF-IDF trains on the other domains; the in-domain TF-IDF and a decision offset fitted
    on a handful of the domain's labels are reported beside them (eval/sentiment_transfer.py).
    """
    from eval.sentiment_transfer import TransferConfig, run_transfer
    from eval.sentiment_transfer import report_only as recompute

    try:
        if report_only:
            if out is None:
                raise ValueError("--report-only needs --out <run folder>")
            recompute(out)
            run_dir = out
        else:
            run_dir = run_transfer(TransferConfig(
                lang=lang, per_domain=per_domain, pool_per_domain=pool_per_domain, shots=shots,
                threshold_k=threshold_k, seed=seed, profile=profile, out=out,
                rankers=tuple(r.strip() for r in rankers.split(",") if r.strip()),
                domains=tuple(x.strip() for x in domains.split(",") if x.strip())))
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    typer.echo(str(run_dir))
    typer.echo((run_dir / "report.md").read_text())


def eval_aspects_cmd(
    n: Annotated[int, typer.Option(help="test sentences (0: all 418)")] = 60,
    ranker: Annotated[AspectsRanker, typer.Option(help="the model, or SemEval-2014's train lexicon")] = "llm",
    seed: Annotated[int, typer.Option(help="sampling seed")] = 2024,
    one_call: Annotated[bool, typer.Option(
        "--one-call", help="aspects in the polarity call (sentiment_joint.v2) instead of the served two calls")] = False,
    profile: Profile = None,
    out: Annotated[Path | None, typer.Option(help="run folder; an existing one resumes")] = None,
) -> None:
    """Aspect extraction on SemEval-2014 laptops: term and joint F1.

    Joint F1 counts an aspect right when both its term and its polarity match the gold.
    """
    from eval.aspect_eval import run_aspect_eval

    try:
        run_dir = run_aspect_eval(n, ranker=ranker, seed=seed, profile=profile, out=out, joint=one_call)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    typer.echo(str(run_dir))
    typer.echo((run_dir / "metrics.json").read_text())
