"""Offline eval of audience targeting on any stored dataset (`shoplens eval audience`).

For the items with the largest audiences in a held-out period, rank users with the served
sources (`agent.tasks.audience`) and score each ranking against the item's real audience.
Retrieval only: the model, which scores the top few in the service, is not in this eval.

Protocol (no leakage: every index and count is built from events strictly before the period):

* held-out period: ``online-retail`` keeps its published month 2011-11-09 .. 2011-12-09
  (validation month 2011-10-09 .. 11-08), so its results stay comparable with
  docs/tasks_results.md. Any other stored dataset (``--dataset``), or online-retail with
  ``--days``, gets the last ``days`` (default 30) before the dataset's robust end (`robust_end`:
  its last timestamp, ignoring the top 0.5%, as the intent and churn evals use), and the
  ``days`` before that as the validation period. Periods are [start, end).
* the audience of an item: the users with an ``event_type`` event on it in the held-out period
  (purchase by default; cart, favourite, view or review for data with few or no purchases, e.g.
  review-only Amazon Beauty). "new" members had no such event on the item before.
* the items: the ``n_items`` with the largest held-out audiences.
* rankers: the fused sources with the weights before tuning, each source alone, the weights
  tuned on the validation period (grid search, best mean NDCG@N on an index built before it),
  and the category-popularity baseline (the users with most ``event_type`` events on items that
  share a title word or the category with the target).

Units: HR@N, Recall@N and NDCG@N are fractions in [0, 1] (not percentages), means over the items.
Writes ``<workspace>/runs/<time>-audience/`` (or ``--out``): config.json, cases.jsonl (each
item's rankings), metrics.json and report.md.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from agent.app.runtime import Runtime
from agent.data.store import EventStore
from agent.domain.errors import ArtifactMismatchError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.settings import Settings
from agent.tasks.audience import (
    POOL_WEIGHTS,
    AudienceIndex,
    category_popularity_baseline,
    fuse_sources,
    predicted_raw,
    source_scores,
)
from agent.tasks.encoder_cases import EncoderTask
from agent.tasks.encoder_train import EncoderScorer
from eval.metrics import hit_rate_at_k, ndcg_at_k, recall_at_k
from eval.tasks_eval import _run_dir, _write, derived_cutoffs, require_dataset

AUDIENCE_MONTH = (datetime(2011, 11, 9, tzinfo=UTC), datetime(2011, 12, 10, tzinfo=UTC))
AUDIENCE_VALIDATION_DAYS = 31  # online-retail's published validation month: 2011-10-09 .. 11-08
DEFAULT_DAYS = 30
# What can define an item's audience (`shoplens eval audience --event-type`).
AUDIENCE_EVENT_TYPES: tuple[str, ...] = ("purchase", "cart", "favourite", "view", "review")
UNTUNED = POOL_WEIGHTS  # the weights before tuning, also the served predicted source's pool
UNITS = "HR@N, Recall@N and NDCG@N are fractions in [0, 1] (not %), means over the evaluated items"

Period = tuple[datetime, datetime]


@dataclass(frozen=True)
class AudiencePeriods:
    """The held-out and validation periods, each [start, end) in UTC.

    Attributes:
        how: ``published`` (online-retail's month) or ``derived`` (the data's last days).
    """

    held_out: Period
    validation: Period
    how: str


def audience_periods(store: EventStore, dataset: str, days: int | None = None) -> AudiencePeriods:
    """The periods of an audience eval: online-retail's published month when ``days`` is None,
    else the last ``days`` (None: 30) before the dataset's robust end, validated on the ``days``
    before that.

    Raises:
        ValueError: ``days`` < 1, or an unknown dataset (naming ``--dataset``, the datasets in
            the store and ``shoplens ingest``).
    """
    if days is not None and days < 1:
        raise ValueError(f"--days {days}: give a positive number of days, e.g. {DEFAULT_DAYS}")
    if dataset == "online-retail" and days is None:
        require_dataset(store, dataset)
        start, end = AUDIENCE_MONTH
        return AudiencePeriods((start, end), (start - timedelta(days=AUDIENCE_VALIDATION_DAYS), start), "published")
    span = timedelta(days=days or DEFAULT_DAYS)
    v_start, start = derived_cutoffs(store, dataset, span)
    return AudiencePeriods((start, start + span), (v_start, start), "derived")


def audiences(events: Iterable[BehaviorEvent], event_type: str, period: Period) -> dict[str, set[str]]:
    """item id -> the users with an ``event_type`` event on it in ``period`` ([start, end))."""
    start, end = period
    out: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.event_type == event_type and start <= e.timestamp < end:
            out[e.item_id].add(e.user_id)
    return dict(out)


def _largest(aud: dict[str, set[str]], k: int) -> list[str]:
    """The k items with the most audience members; ties keep the order the items were first seen
    in (user, time order), so online-retail's published run keeps its 30 items."""
    return [i for i, _ in Counter({i: len(u) for i, u in aud.items()}).most_common(k)]


def _span(p: Period) -> str:
    return f"{p[0]:%Y-%m-%d %H:%M} .. {p[1]:%Y-%m-%d %H:%M} UTC"


def _event_summary(events: Sequence[BehaviorEvent]) -> str:
    """``purchase 8 (2024-01-03 .. 2024-02-04), view 2 (...)``: count and date range per type."""
    first: dict[str, datetime] = {}
    last: dict[str, datetime] = {}
    count: Counter[str] = Counter()
    for e in events:
        count[e.event_type] += 1
        first[e.event_type] = min(first.get(e.event_type, e.timestamp), e.timestamp)
        last[e.event_type] = max(last.get(e.event_type, e.timestamp), e.timestamp)
    return ", ".join(f"{t} {c} ({first[t]:%Y-%m-%d} .. {last[t]:%Y-%m-%d})" for t, c in count.most_common()) or "none"


def _tune_weights(raws: dict[str, dict[str, dict[str, float]]], aud: dict[str, set[str]], n: int,
                  sources: Sequence[str] = ("repeat", "co_purchase", "similar_users")
                  ) -> tuple[dict[str, float], dict[str, Any]]:
    """Grid over fusion weights (each source 0, 1, 2 or 4), best mean NDCG@n on the validation
    period. `raws`: item -> its raw source scores (`source_scores`, plus ``predicted`` when the
    encoder is in the eval), computed once per item."""
    grid = [dict(zip(sources, w, strict=True)) for w in itertools.product((0, 1, 2, 4), repeat=len(sources)) if any(w)]
    scores = []
    for w in grid:
        vals = [ndcg_at_k([u for u, _, _ in fuse_sources(raw, w, n=n)], aud[i], n) for i, raw in raws.items()]
        scores.append((float(np.mean(vals)), w))
    best = max(scores, key=lambda x: x[0])
    return best[1], {"validation_items": len(raws), "best_val_ndcg": round(best[0], 4), "weights": best[1]}


class _Predicted:
    """The ``predicted`` source in the eval: the trained encoder over each item's candidate pool
    (the untuned fusion's top `pool` users), as the served audience uses it."""

    def __init__(self, scorer: EncoderScorer, events: Sequence[BehaviorEvent], catalog: Mapping[str, CatalogItem],
                 pool: int):
        self.scorer, self.catalog, self.pool = scorer, catalog, pool
        self.by_user: dict[str, list[BehaviorEvent]] = defaultdict(list)
        for e in events:
            self.by_user[e.user_id].append(e)
        self.cases = 0

    def raw(self, idx: AudienceIndex, item: str, as_of: datetime) -> dict[str, dict[str, float]]:
        """The item's raw sources with ``predicted`` added (users scored as of `as_of`)."""
        raw = predicted_raw(idx, item, self.scorer, lambda u: self.by_user.get(u, []), as_of, pool=self.pool)
        self.cases += len(raw["predicted"])
        return raw


def load_eval_encoder(settings: Settings, dataset: str, task: EncoderTask, first_unseen: datetime) -> EncoderScorer:
    """The dataset's trained encoder, refused when its training labels reach `first_unseen`
    (the start of the first period it would be tuned or tested on).

    Raises:
        ValueError: none trained, a failed manifest check, or a leak; the message gives the
            train command (with ``--until``).
    """
    fix = (f"shoplens train --dataset {dataset} --task {task} --model bert "
           f"--until {first_unseen.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}")
    try:
        scorer = EncoderScorer.load(settings.index_dir(dataset), dataset, task)
    except (FileNotFoundError, ArtifactMismatchError) as e:
        raise ValueError(f"--encoder {task}: {e}; for this eval train it with `{fix}`") from e
    man = scorer.trained.manifest
    label_end = max(datetime.fromisoformat(c) for c in man["cutoffs"]) + timedelta(hours=float(man["horizon_h"]))
    if label_end > first_unseen:
        raise ValueError(f"--encoder {task}: the {dataset} {task} encoder learnt from labels up to "
                         f"{label_end.isoformat()}, after this eval's first tuning/held-out day "
                         f"{first_unseen.isoformat()}: it would have seen the answers. Train one that stops "
                         f"before it: `{fix}` (then retrain without --until to serve)")
    return scorer


def run_audience_eval(settings: Settings, *, dataset: str = "online-retail", days: int | None = None,
                      event_type: str = "purchase", n_items: int = 30, n: int = 50, out: Path | None = None,
                      tune: bool = True, encoder: EncoderTask | None = None, pool: int = 200) -> Path:
    """Audience targeting on a held-out period (see the module docstring); returns the run folder.

    Args:
        dataset: any stored dataset; ``online-retail`` without ``days`` keeps its published month.
        days: length of the held-out and of the validation period, in days (None: 30, or the
            published month for online-retail).
        event_type: the events that define an item's audience, one of `AUDIENCE_EVENT_TYPES`.
        n_items: evaluate the items with the largest held-out audiences, at most this many.
        n: the N of HR@N, Recall@N and NDCG@N (users ranked per item).
        encoder: also the ``predicted`` source, the dataset's trained click or purchase encoder
            re-ranking each item's pool (the untuned fusion's top `pool` users), alone and in
            the tuned fusion; it must have been trained on labels before the first period
            (`load_eval_encoder`).

    Raises:
        ValueError: a bad ``--event-type``, ``--days``, ``--items`` or ``-n``, an unknown dataset,
            no ``event_type`` events in the held-out period (the message counts the dataset's
            events per type and when they happened), or an audience none of whom has an event
            before the period. Checked before any run folder is created.
    """
    if event_type not in AUDIENCE_EVENT_TYPES:
        raise ValueError(f"--event-type {event_type}: choose one of {', '.join(AUDIENCE_EVENT_TYPES)}")
    if n_items < 1 or n < 1:
        raise ValueError(f"--items {n_items} and -n {n} must both be at least 1")
    rt = Runtime(settings)
    store, ds = rt.store, dataset
    periods = audience_periods(store, ds, days)
    start, end = periods.held_out
    events = list(store.iter_events(ds))  # ordered by (user, time), as AudienceIndex.build needs
    held = audiences(events, event_type, periods.held_out)
    if not held:
        what = "online-retail's published month" if periods.how == "published" else \
            f"the last {days or DEFAULT_DAYS} days before the data's end"
        raise ValueError(f"--dataset {ds} has no {event_type} events in the held-out period {_span(periods.held_out)} "
                         f"({what}); its events: {_event_summary(events)}. Try a longer --days or another "
                         f"--event-type ({', '.join(AUDIENCE_EVENT_TYPES)})")
    top = _largest(held, n_items)
    known_users = {e.user_id for e in events if e.timestamp < start}
    members = set().union(*(held[i] for i in top))
    if not members & known_users:  # every figure would be 0 by construction
        raise ValueError(f"--dataset {ds}: none of the {len(members)} users with {event_type} events on the "
                         f"{_items(len(top))} evaluated in the held-out period {_span(periods.held_out)} has an "
                         f"earlier event ({len(known_users)} users have one), so no ranker can find them; the period "
                         "starts before most of the data: try a shorter --days")
    first_unseen = periods.validation[0] if tune else start
    scorer = load_eval_encoder(settings, ds, encoder, first_unseen) if encoder else None
    d = _run_dir("audience", out, settings.workspace)
    catalog = store.items(ds)
    item_index = rt.artifacts(ds).item_index  # content only (titles); behaviour comes from before `start`
    t0 = time.perf_counter()
    kinds = (event_type,)
    idx = AudienceIndex.build(events, catalog, item_index, cutoff=start, event_types=kinds)
    before = [(e.user_id, e.item_id) for e in events if e.event_type == event_type and e.timestamp < start]
    skipped: dict[str, Any] = {
        "events_at_or_after_held_out_end": sum(e.timestamp >= end for e in events),
        "items_beyond_n_items": max(0, len(held) - len(top)), "items_without_new_audience": 0, "tuning": None}
    tuned, val_info = None, {}
    v_aud = audiences(events, event_type, periods.validation) if tune else {}
    pred = _Predicted(scorer, events, catalog, pool) if scorer else None
    if v_aud:  # fusion weights picked on the validation period, with an index built before it
        v0 = periods.validation[0]
        v_idx = AudienceIndex.build(events, catalog, item_index, cutoff=v0, event_types=kinds)
        v_items = _largest(v_aud, n_items)
        raws = {i: pred.raw(v_idx, i, v0) if pred else source_scores(v_idx, i) for i in v_items}
        tuned, val_info = _tune_weights(raws, v_aud, n, ("repeat", "co_purchase", "similar_users")
                                        + (("predicted",) if pred else ()))
    else:
        skipped["tuning"] = ("not asked (tune=False)" if not tune else
                             f"no {event_type} events in the validation period {_span(periods.validation)}: "
                             "only the untuned weights are reported")
    build_s = time.perf_counter() - t0
    scorers: dict[str, dict[str, float]] = {
        "fused (weights before tuning: 0.4/0.35/0.25)": UNTUNED, "repeat only": {"repeat": 1.0},
        "co_purchase only": {"co_purchase": 1.0}, "similar_users only": {"similar_users": 1.0}}
    if pred:
        scorers[f"predicted only (the {encoder} encoder over the top {pool})"] = {"predicted": 1.0}
    if tuned:
        scorers["fused (weights tuned on the validation period)"] = tuned
    res: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    n_cold = 0
    with (d / "cases.jsonl").open("w") as fh:
        for item in top:
            rel = held[item]
            new = rel - set(idx.buyers.get(item, {}))
            cold = rel - known_users
            n_cold += len(cold)
            skipped["items_without_new_audience"] += not new
            raw = pred.raw(idx, item, start) if pred else source_scores(idx, item)
            lists = {name: [u for u, _, _ in fuse_sources(raw, w, n=n)] for name, w in scorers.items()}
            lists["category popularity (baseline)"] = category_popularity_baseline(before, catalog, item, n=n)
            for name, ranked in lists.items():
                for tag, r in (("all", rel), ("new", new)):
                    if not r:
                        continue
                    res[name][f"HR@{n} {tag}"].append(hit_rate_at_k(ranked, r, n))
                    res[name][f"Recall@{n} {tag}"].append(recall_at_k(ranked, r, n))
                    res[name][f"NDCG@{n} {tag}"].append(ndcg_at_k(ranked, r, n))
            fh.write(json.dumps({"case_id": item, "title": idx.title(item), "n_audience": len(rel), "n_new": len(new),
                                 "n_cold": len(cold), "ranked": lists}) + "\n")
    metrics: dict[str, Any] = {name: {k: round(float(np.mean(v)), 4) for k, v in m.items()} for name, m in res.items()}
    n_new_items = len(top) - skipped["items_without_new_audience"]
    audience_size = sum(len(held[i]) for i in top)
    metrics["_info"] = {"items": len(top), "items_with_new_audience": n_new_items, "n": n, "units": UNITS,
                        "audience_members": audience_size, "cold_audience_members": n_cold,
                        "build_seconds": round(build_s, 1), "tuning": val_info,
                        "encoder": None if scorer is None else {
                            "task": encoder, "pool": pool, "cases_scored": pred.cases if pred else 0,
                            "cutoffs": scorer.trained.manifest["cutoffs"], "horizon_h": scorer.horizon_h,
                            "data_sha256": scorer.trained.manifest["data_sha256"]},
                        "seconds_per_item": round((time.perf_counter() - t0 - build_s) / max(1, len(top)), 3)}
    config = {"task": "audience", "dataset": ds, "event_type": event_type,
              "days": None if periods.how == "published" else days or DEFAULT_DAYS,
              "held_out": [t.isoformat() for t in periods.held_out],
              "validation": [t.isoformat() for t in periods.validation], "periods": periods.how,
              "n_items": n_items, "n": n, "items": len(top), "weights": {"untuned": UNTUNED, "tuned": tuned},
              "encoder": encoder, "pool": pool if encoder else None,
              "skipped": skipped, "units": UNITS, "item_index": item_index.manifest.__dict__,
              "note": f"user index, co-visitation and {event_type} counts from events before the held-out period "
                      "only; item vectors are title embeddings"}
    _write(d, config, metrics, _report(ds, event_type, periods, days, metrics, n, len(held), skipped))
    paired_items(d, settings)
    return d


REFERENCE = "fused (weights before tuning: 0.4/0.35/0.25)"


def paired_items(run_dir: Path, settings: Settings, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-item NDCG@N of every recorded ranking, and each ranker's paired difference from the
    untuned fusion with a 95% bootstrap interval over items (the items resampled with
    replacement). The held-out audiences are recomputed from the store with the run's config
    (period and event type), so a finished run gets them without re-ranking anything. Writes
    ``item_metrics.jsonl`` and adds ``_paired`` to metrics.json (and its table to report.md).

    Raises:
        FileNotFoundError: `run_dir` has no config.json or cases.jsonl.
        ValueError: the run's dataset is not in the store.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "cases.jsonl").read_text().splitlines() if x.strip()]
    store = Runtime(settings).store
    require_dataset(store, config["dataset"])
    held = tuple(datetime.fromisoformat(t) for t in config["held_out"])
    events = list(store.iter_events(config["dataset"]))
    aud = audiences(events, config["event_type"], (held[0], held[1]))
    before: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if e.event_type == config["event_type"] and e.timestamp < held[0]:
            before[e.item_id].add(e.user_id)
    n = int(config["n"])
    per: list[dict[str, Any]] = []
    for r in rows:
        rel = aud.get(r["case_id"], set())
        new = rel - before.get(r["case_id"], set())
        per.append({"case_id": r["case_id"], "n_audience": len(rel), "n_new": len(new),
                    "ndcg_all": {k: ndcg_at_k(v, rel, n) for k, v in r["ranked"].items()},
                    "ndcg_new": {k: ndcg_at_k(v, new, n) if new else None for k, v in r["ranked"].items()}})
    with (run_dir / "item_metrics.jsonl").open("w") as fh:
        fh.writelines(json.dumps(x) + "\n" for x in per)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"reference": REFERENCE, "n_items": len(per), "n_boot": n_boot}
    for name in (per[0]["ndcg_all"] if per else {}):
        if name == REFERENCE:
            continue
        row: dict[str, Any] = {}
        for tag in ("all", "new"):
            d = np.array([x[f"ndcg_{tag}"][name] - x[f"ndcg_{tag}"][REFERENCE] for x in per
                          if x[f"ndcg_{tag}"][name] is not None])
            if not len(d):
                continue
            boots = [float(np.mean(d[rng.integers(0, len(d), len(d))])) for _ in range(n_boot)]
            row[f"NDCG@{n} {tag} diff"] = round(float(np.mean(d)), 4)
            row[f"NDCG@{n} {tag} diff_ci"] = [round(float(np.percentile(boots, 2.5)), 4),
                                              round(float(np.percentile(boots, 97.5)), 4)]
            row[f"n_{tag}"] = len(d)
        out[name] = row
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["_paired"] = out
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    report = (run_dir / "report.md").read_text().split("\n## Paired")[0]
    (run_dir / "report.md").write_text(report + _paired_table(out, n))
    return out


def _paired_table(paired: dict[str, Any], n: int) -> str:
    lines = [f"\n## Paired differences from the untuned fusion (95% bootstrap CI over {paired['n_items']} items)\n",
             f"| ranker | NDCG@{n} all − fused [CI] | NDCG@{n} new − fused [CI] (items) |", "|---|---|---|"]
    for name, r in paired.items():
        if not isinstance(r, dict):
            continue
        cells = []
        for tag in ("all", "new"):
            k = f"NDCG@{n} {tag} diff"
            cells.append(f"{r[k]:+.4f} [{r[k + '_ci'][0]:+.4f}, {r[k + '_ci'][1]:+.4f}]" + (f" ({r['n_new']})" if tag == "new" else "")
                         if k in r else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _items(k: int) -> str:
    return f"{k} item" + "s" * (k != 1)


def _report(ds: str, event_type: str, periods: AudiencePeriods, days: int | None, metrics: dict[str, Any], n: int,
            n_held: int, skipped: dict[str, Any]) -> str:
    info = metrics["_info"]
    how = ("online-retail's published month" if periods.how == "published"
           else f"the last {days or DEFAULT_DAYS} days before the data's robust end")
    keys = [f"HR@{n} all", f"Recall@{n} all", f"NDCG@{n} all", f"Recall@{n} new", f"NDCG@{n} new"]
    lines = ["| ranker | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    lines += [f"| {k} | " + " | ".join(f"{v.get(c, float('nan')):.4f}" for c in keys) + " |"
              for k, v in metrics.items() if not k.startswith("_")]
    return (f"# audience eval: {ds}, audience = {event_type} events\n\n"
            f"Held-out period {_span(periods.held_out)} ({how}); validation (tuning) period "
            f"{_span(periods.validation)}. The audience of an item = the users with a {event_type} event on it "
            f"in the held-out period; 'new' = those without one on it before.\n\n"
            f"n = {_items(info['items'])} (the largest held-out audiences; {_items(n_held)} had one), N = {n}; "
            f"the 'new' columns are over the {_items(info['items_with_new_audience'])} with new members. "
            f"{info['cold_audience_members']} of {info['audience_members']} audience members had no event at all "
            "before the period (no ranker can find them).\n\n"
            f"**Units: {UNITS}.**\n\n" + "\n".join(lines) + "\n\n"
            f"Skipped: `{json.dumps(skipped)}`\n")
