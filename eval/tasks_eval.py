"""Offline evals for purchase intent (Taobao, or any stored dataset), and the helpers the other
task evals share; churn is `eval.churn_eval`, audience targeting `eval.audience_eval`. Each writes
``<workspace>/runs/<ts>-<task>/``: config.json (prompt ref + sha, model id, seed), cases.jsonl
(per-case raw responses; an interrupted run resumes from it), metrics.json and report.md with a
calibration plot.

Protocols (no leakage: features only from events strictly before the cut-off):

* intent: (user, item) pairs the user viewed/carted/favourited in the 72 h before the cut-off;
  label = bought within 48 h after it. Train cut-off 2017-11-30 00:00 China time (the baseline's
  logistic regression), test cut-off 2017-12-02 00:00 (the last two days are the label period).
* churn (`eval.churn_eval`): users with >= 1 purchase before the as-of date; label = no purchase
  in the next 90 days. RFM baseline trained at 2011-06-01, tested at 2011-09-01.
* any other stored dataset (`--dataset`): the same rows and labels with cut-offs derived from
  the data (`derived_cutoffs`): the test label period is the dataset's last horizon, the
  training label period the horizon before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from agent.app.runtime import Runtime
from agent.llm.prompting import load_prompt
from agent.settings import Settings
from agent.tasks.common import Blend, LogisticBaseline, logit
from agent.tasks.intent import IntentService
from agent.tasks.rows import (
    fit_intent_baseline,
    intent_rows,
    robust_end,
)
from eval.metrics import (
    calibration_bins,
    expected_calibration_error,
)
from eval.runs import read_jsonl, run_folder

log = logging.getLogger(__name__)
CHINA = timezone(timedelta(hours=8))
INTENT_TRAIN_CUTOFF = datetime(2017, 11, 30, tzinfo=CHINA)
INTENT_TEST_CUTOFF = datetime(2017, 12, 2, tzinfo=CHINA)
INTENT_HORIZON_H = 48.0

# ---- metrics (plain functions) ---------------------------------------------------------------


def brier_score(y: Sequence[int], p: Sequence[float]) -> float:
    """Mean squared error of probabilities against 0/1 outcomes (Brier, 1950); lower is better."""
    if len(y) != len(p) or not y:
        raise ValueError("y and p must be non-empty and of equal length")
    return float(sum((pi - yi) ** 2 for yi, pi in zip(y, p, strict=True)) / len(y))


def roc_auc(y: Sequence[int], p: Sequence[float]) -> float | None:
    """ROC AUC (None when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y)) == 2 else None


def pr_auc(y: Sequence[int], p: Sequence[float]) -> float | None:
    """Average precision (area under the precision-recall curve); None without positives."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p)) if sum(y) else None


def binary_metrics(y: Sequence[int], p: Sequence[float]) -> dict[str, Any]:
    return {"n": len(y), "positives": int(sum(y)), "roc_auc": roc_auc(y, p), "pr_auc": pr_auc(y, p),
            "brier": brier_score(y, p), "ece": expected_calibration_error(y, p)}


def cross_fit_blend(y: Sequence[int], p_base: Sequence[float], p_model: Sequence[float], seed: int = 0) -> tuple[list[float], Blend]:
    """2-fold cross-fitted stacker: logistic regression on [logit p_base, logit p_model]; each half
    is predicted by the fit on the other half. Returns the out-of-fold probabilities and the blend
    fitted on all cases (what the service then uses)."""
    from sklearn.linear_model import LogisticRegression

    X = np.array([[logit(a), logit(b)] for a, b in zip(p_base, p_model, strict=True)])
    yy = np.array(y)
    folds = np.array([random.Random(seed + i).random() < 0.5 for i in range(len(y))])
    out = np.zeros(len(y))
    for f in (True, False):
        tr, te = folds != f, folds == f
        if te.sum() == 0 or len(set(yy[tr])) < 2:
            out[te] = np.array(p_base)[te]
            continue
        out[te] = LogisticRegression(C=1.0).fit(X[tr], yy[tr]).predict_proba(X[te])[:, 1]
    full = LogisticRegression(C=1.0).fit(X, yy) if len(set(y)) == 2 else None
    blend = Blend(float(full.coef_[0][0]), float(full.coef_[0][1]), float(full.intercept_[0])) if full else Blend()
    return [float(x) for x in out], blend


# ---- run folders ---------------------------------------------------------------------------------


def _run_dir(task: str, out: Path | None, workspace: Path | None = None) -> Path:
    """``out``, else ``<workspace>/runs/<time>-<task>`` (created)."""
    return run_folder(task, out, Path(workspace) / "runs" if workspace is not None else None)


def require_dataset(store: Any, dataset: str) -> None:
    """Refuse a dataset the store does not hold, before any work.

    Raises:
        ValueError: the store has no such dataset (naming ``--dataset``, those that exist and
            ``shoplens ingest``).
    """
    if not store.has_dataset(dataset):
        raise ValueError(f"--dataset {dataset}: no such dataset in the store (datasets there: "
                         f"{', '.join(store.datasets()) or 'none'}); load it with `shoplens ingest`")


def derived_cutoffs(store: Any, dataset: str, horizon: timedelta) -> tuple[datetime, datetime]:
    """(training cut-off, test cut-off) for a dataset without published ones: the test cut-off is
    the dataset's end (`robust_end`) minus ``horizon``, so its label period is the data's last
    horizon; the training cut-off is one horizon earlier, so training labels end where the test
    features begin.

    Raises:
        ValueError: the dataset is unknown or has no events (naming ``--dataset`` and those that exist).
    """
    require_dataset(store, dataset)
    end = robust_end(store, dataset)
    return end - 2 * horizon, end - horizon


def _fit(fit: Any, rows: list[Any], what: str, flag: str) -> LogisticBaseline:
    """The task's baseline, or a ValueError that says which rows and which flag to change."""
    if not rows:
        raise ValueError(f"no {what}; try another {flag}")
    try:
        return fit(rows, what)
    except ValueError as e:  # one class only
        rate = sum(r.label for r in rows) / len(rows)
        raise ValueError(f"{what}: {len(rows)} rows, positive rate {rate:.0%}: one class only, no baseline "
                         f"can be fitted; try another {flag}") from e


def _done_cases(d: Path, file: str = "cases.jsonl") -> dict[str, dict[str, Any]]:
    return {r["case_id"]: r for r in read_jsonl(d / file)}


def _plot_calibration(path: Path, series: dict[str, tuple[Sequence[int], Sequence[float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", label="perfect")
    for name, (y, p) in series.items():
        bins = calibration_bins(y, p)
        ax.plot([b["mean_p"] for b in bins], [b["rate"] for b in bins], "o-", label=name)
    ax.set(xlabel="predicted probability", ylabel="observed rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: dict[str, dict[str, Any]]) -> str:
    cols = ["n", "positives", "roc_auc", "pr_auc", "brier", "ece"]
    lines = ["| scorer | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, m in rows.items():
        cells = [f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c)) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _prompt_refs(refs: Sequence[str]) -> dict[str, str]:
    return {r: load_prompt(r).sha256 for r in refs}


def _write(d: Path, config: dict[str, Any], metrics: dict[str, Any], report: str) -> Path:
    (d / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (d / "report.md").write_text(report)
    return d


def _sample(rows: list[Any], n: int, seed: int, pos_share: float | None) -> list[int]:
    """Indices of a seeded sample; with `pos_share`, positives are oversampled to that share."""
    rng = random.Random(seed)
    idx = list(range(len(rows)))
    if pos_share is None:
        return rng.sample(idx, min(n, len(idx)))  # random order: a partial run is a random subset
    pos = [i for i in idx if rows[i].label == 1]
    neg = [i for i in idx if rows[i].label == 0]
    k = min(len(pos), int(n * pos_share))
    pick = rng.sample(pos, k) + rng.sample(neg, min(len(neg), n - k))
    rng.shuffle(pick)
    return pick


async def _model_cases(d: Path, rt: Runtime, todo: list[tuple[str, Any]], predict: Any, n_explain: int,
                       budget_s: float | None = None, file: str = "cases.jsonl") -> None:
    """Run `predict(model, case, explain)` for cases not yet in `file` (in `d`), appending each;
    stops starting new cases after `budget_s` seconds (a later call resumes)."""
    done = _done_cases(d, file)
    if budget_s == 0 or all(cid in done for cid, _ in todo):
        return  # re-score from the recorded cases: no model needed
    model = await rt.model()
    start = time.perf_counter()
    with (d / file).open("a") as fh:
        for k, (cid, case) in enumerate(todo):
            if cid in done:
                continue
            if budget_s is not None and time.perf_counter() - start > budget_s:
                log.warning("time budget spent: %d of %d cases left for a later resume", len(todo) - k, len(todo))
                break
            t0 = time.perf_counter()
            try:
                rec = await predict(model, case, k < n_explain)
            except Exception as e:  # one bad case never aborts the run
                rec = {"error": f"{type(e).__name__}: {e}"}
            rec.update(case_id=cid, seconds=round(time.perf_counter() - t0, 3))
            fh.write(json.dumps(rec, default=str) + "\n")
            fh.flush()
            log.info("case %d/%d %s %.1fs", k + 1, len(todo), cid, rec["seconds"])


def _model_summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in recs if "error" not in r]
    expl = [r for r in ok if r.get("explained")]
    return {"cases": len(recs), "errors": len(recs) - len(ok),
            "verbalizer_valid_rate": sum(r.get("p_model") is not None for r in ok) / max(1, len(recs)),
            "explained": len(expl), "explanation_valid_rate": sum(r.get("reason_source") == "model" for r in expl) / max(1, len(expl)),
            "seconds_per_case": sum(r["seconds"] for r in ok) / max(1, len(ok))}


async def _binary_eval(task: str, settings: Settings, rows: list[Any], base: LogisticBaseline, vec: Any,
                       n_model: int, seed: int, out: Path | None, predict: Any, pos_share: float | None,
                       prompts: list[str], extra_config: dict[str, Any], n_explain: int,
                       budget_s: float | None = None, extra_scorers: dict[str, list[float]] | None = None) -> Path:
    """`extra_scorers`: name -> a probability per row (trivial baselines), scored on all rows.
    A row's case id is its `case_id` attribute, else "user|item"."""
    d = _run_dir(task, out, settings.workspace)
    y = [r.label for r in rows]
    pb = [base.predict(vec(r)) for r in rows]
    metrics: dict[str, Any] = {"baseline_all": binary_metrics(y, pb)}
    series = {"baseline (all)": (y, pb)}
    for name, ps in (extra_scorers or {}).items():
        metrics[name] = binary_metrics(y, ps)
        series[name] = (y, ps)
    rt = Runtime(settings)
    config = {"task": task, "seed": seed, "n_model": n_model, "baseline": base.__dict__ | {"blend": None},
              "prompts": _prompt_refs(prompts), **extra_config}
    try:
        if n_model:
            pick = _sample(rows, n_model, seed, pos_share)
            ids = [getattr(rows[i], "case_id", None) or f"{rows[i].user_id}|{getattr(rows[i], 'item_id', '')}"
                   for i in pick]
            await _model_cases(d, rt, [(cid, rows[i]) for cid, i in zip(ids, pick, strict=True)], predict, n_explain,
                               budget_s)
            recs = list(_done_cases(d).values())
            metas = [r["meta"] for r in recs if "meta" in r]
            config.update(model_id=metas[0]["model_id"] if metas else None, model_sha256=rt.model_sha256)
            metrics["partial"] = f"{len(recs)} of {len(pick)} sampled cases scored" if len(recs) < len(pick) else None
            ok = [r for r in recs if r.get("p_model") is not None]
            ys, bs, ms = [r["label"] for r in ok], [r["p_base"] for r in ok], [r["p_model"] for r in ok]
            fused_default = [Blend()(a, b) for a, b in zip(bs, ms, strict=True)]
            cross, fitted = cross_fit_blend(ys, bs, ms, seed)
            metrics.update({"sample_baseline": binary_metrics(ys, bs), "sample_model_verbalizer": binary_metrics(ys, ms),
                            "sample_blend_default": binary_metrics(ys, fused_default),
                            "sample_blend_crossfit": binary_metrics(ys, cross), "fitted_blend": fitted.__dict__,
                            "model": _model_summary(recs)})
            series.update({"baseline (sample)": (ys, bs), "model verbalizer": (ys, ms), "blend (cross-fit)": (ys, cross)})
            base.blend = fitted
            base.save(d / f"baseline-{task}.json")
    finally:
        await rt.aclose()
    _plot_calibration(d / "calibration.png", series, task)
    rows_t = {k: v for k, v in metrics.items() if isinstance(v, dict) and "brier" in v}
    report = (f"# {task} eval\n\nConfig: `{json.dumps({k: config[k] for k in config if k != 'baseline'}, default=str)}`\n\n"
              + _table(rows_t) + "\n\n" + (f"Model: `{json.dumps(metrics.get('model'))}`\n\n" if "model" in metrics else "")
              + "![calibration](calibration.png)\n")
    return _write(d, config, metrics, report)


# ---- tasks -------------------------------------------------------------------------------------


def intent_case_record(label: int, p: Any, explained: bool) -> dict[str, Any]:
    """One model case of an intent eval (per item or per session) as cases.jsonl stores it."""
    return {"label": label, "p_base": p.baseline_probability, "p_model": p.model_probability,
            "p_final": p.probability, "explained": explained, "stage": p.stage, "reason": p.reason,
            "reason_source": p.reason_source, "evidence": [e.event_id for e in p.evidence],
            "meta": p.meta.model_dump(mode="json")}


def run_intent_eval(settings: Settings, *, n_model: int = 150, seed: int = 0, out: Path | None = None,
                    n_explain: int = 10, budget_s: float | None = None, dataset: str = "taobao",
                    horizon_hours: float = INTENT_HORIZON_H) -> Path:
    """Purchase intent per (user, item) pair: the baseline on every test row, the model on a sample.

    ``taobao`` keeps its published cut-offs (48 h); any other stored dataset gets
    `derived_cutoffs` with ``horizon_hours``.

    Raises:
        ValueError: an unknown dataset, no rows, or rows of one class (the message names the flag).
    """
    rt = Runtime(settings)
    store, ds = rt.store, dataset
    if ds == "taobao" and horizon_hours == INTENT_HORIZON_H:
        train_cut, cut = INTENT_TRAIN_CUTOFF, INTENT_TEST_CUTOFF
    else:
        train_cut, cut = derived_cutoffs(store, ds, timedelta(hours=horizon_hours))
    catalog = store.items(ds)
    train = intent_rows(store, ds, train_cut, horizon_hours, catalog)
    test = intent_rows(store, ds, cut, horizon_hours, catalog)
    base = _fit(fit_intent_baseline, train, f"{ds} pairs at {train_cut:%Y-%m-%d %H:%M %z}, {horizon_hours:g} h",
                "--horizon-hours (intent pairs need views, carts or favourites)")
    if not test:
        raise ValueError(f"no {ds} test pairs before {cut:%Y-%m-%d %H:%M %z}; try another --horizon-hours")

    async def predict(model: Any, r: Any, explain: bool) -> dict[str, Any]:
        evs = store.user_events(ds, r.user_id, before=cut)
        p = await IntentService(model, base, explain=explain).predict(r.user_id, r.item_id, evs, catalog, as_of=cut,
                                                                      horizon_hours=horizon_hours, dataset=ds)
        return intent_case_record(r.label, p, explain)

    return asyncio.run(_binary_eval(
        "intent", settings, test, base, lambda r: r.funnel.vector(), n_model, seed, out, predict, 1 / 3,
        ["purchase_intent.v1", "purchase_intent_explain.v1"],
        {"dataset": ds, "train_cutoff": train_cut, "test_cutoff": cut, "horizon_h": horizon_hours,
         "n_train": len(train), "train_positives": sum(r.label for r in train), "n_test": len(test),
         "test_positives": sum(r.label for r in test), "sample": "positives oversampled to 1/3"}, n_explain, budget_s))
