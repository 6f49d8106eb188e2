"""The churn eval (Online Retail, or any stored dataset): the RFM baseline, the model's P(churn)
and the blend, side by side on the same model-scored test users, with bootstrap intervals.

Protocol (no leakage: features only from events strictly before the cut-off): users with >= 1
purchase before the as-of date; label = no purchase in the next `horizon_days`. Online Retail:
the RFM baseline is trained at 2011-06-01 and tested at 2011-09-01 (90 days); any other dataset
gets `agent.tasks.churn_blend.churn_cutoffs` (test: its last horizon; training: the one before).

On the model-scored test sample, `churn_compare` reports (`agent.tasks.binary_stats.compare_scorers`:
ROC AUC, PR AUC, log loss with stratified-bootstrap 95% intervals, ECE, and the paired ROC/PR AUC
difference from the baseline on the same cases):

* ``baseline``: the RFM baseline; ``model``: the verbalizer's P(churn) alone;
* ``blend_crossfit``: each case scored by a `Stack` fitted on the other folds' test cases
  (`agent.tasks.stack.cross_fitted`, the one-SE rules, baseline as the reference): what the
  fitting procedure gives on these users, with no validation users needed;
* ``blend_served``: the dataset's served blend (``shoplens train --task churn``, fitted on
  validation users at the earlier cut-off) applied to these cases, when one exists, was fitted
  for this model, prompt and baseline, and its labels end before the test period; weight 0
  gives the baseline's numbers exactly.

The run folder holds config.json (with the served blend's fields), cases.jsonl (per-case raw
responses, p_base and p_model; an interrupted run resumes from it), scores.jsonl (every scorer's
probability per case), metrics.json, report.md and calibration.png. `rescore` recomputes the
sample's comparison from cases.jsonl and config.json with no model (``shoplens eval rescore``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent.app.answers import prompt_id
from agent.app.runtime import Runtime
from agent.settings import Settings
from agent.tasks.binary_stats import compare_scorers
from agent.tasks.churn import PROB_PROMPT, ChurnService, rfm_vector
from agent.tasks.churn_blend import (
    FittedChurnBlend,
    ServedChurnBlend,
    blend_file,
    churn_cutoffs,
    load_churn_blend,
)
from agent.tasks.common import LogisticBaseline
from agent.tasks.profile import catalogue_prices
from agent.tasks.rows import churn_rows, fit_churn_baseline, robust_end
from agent.tasks.stack import Stack, cross_fitted
from eval.runs import read_jsonl
from eval.tasks_eval import (
    _done_cases,
    _fit,
    _model_cases,
    _model_summary,
    _plot_calibration,
    _prompt_refs,
    _run_dir,
    _sample,
    _write,
    binary_metrics,
    require_dataset,
)

SCORERS = ("baseline", "model", "blend_crossfit", "blend_served")


def churn_compare(y: Sequence[int], p_base: Sequence[float], p_model: Sequence[float], *,
                  served: ServedChurnBlend | None = None, seed: int = 0, n_boot: int = 1000
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]], list[str]]:
    """Baseline, model, cross-fitted blend (and the served blend) on the same cases.

    Args:
        y: 1 = churned, shape (n,), both classes present.
        p_base, p_model: the baseline's and the model's P(churn) per case.
        served: the served blend, scored as `ChurnService` serves it (weight 0: the baseline).

    Returns:
        (`compare_scorers` rows per scorer, reference "baseline"; each scorer's probability per
        case; the candidate each cross-fitting fold chose).

    Raises:
        ValueError: one class only, or unequal lengths.
    """
    pb, pm = [float(x) for x in p_base], [float(x) for x in p_model]
    cf, chosen = cross_fitted(y, {"baseline": pb, "llm": pm}, seed=seed, reference="baseline")
    scores = {"baseline": pb, "model": pm, "blend_crossfit": cf}
    if served is not None:
        scores["blend_served"] = [served.probability(a, b)[0] for a, b in zip(pb, pm, strict=True)]
    return compare_scorers(y, scores, reference="baseline", n_boot=n_boot, seed=seed), scores, chosen


def served_for_eval(fitted: FittedChurnBlend | None, *, model: str | None, prompt: str,
                    baseline: LogisticBaseline, test_as_of: datetime) -> tuple[ServedChurnBlend | None, str]:
    """(the served blend to score on the test sample, or None; what the report says about it).
    A blend whose validation labels reach this eval's test period is not scored."""
    if fitted is None:
        return None, "no served churn blend fitted for this dataset and horizon (`shoplens train --task churn`)"
    label_end = datetime.fromisoformat(fitted.as_of) + timedelta(days=fitted.horizon_days)
    if label_end > test_as_of:
        return None, (f"the served blend was fitted at {fitted.as_of[:10]}: its labels reach {label_end:%Y-%m-%d}, "
                      f"inside this test period (from {test_as_of:%Y-%m-%d}); not scored")
    served = fitted.served_for(model, prompt, baseline)
    return served, served.note


def _report(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    cfg = {k: v for k, v in config.items() if k not in ("baseline", "served_blend")}
    lines = [f"# churn eval\n\nConfig: `{json.dumps(cfg, default=str)}`\n",
             f"All test buyers, baseline: `{json.dumps(metrics.get('baseline_all'), default=str)}`\n"]
    cmp = metrics.get("sample")
    if cmp:
        lines += ["Model-scored sample (95% stratified-bootstrap intervals; differences paired on the same cases, "
                  "vs the baseline):\n",
                  "| scorer | n | positives | ROC AUC | PR AUC | log loss | ECE | ROC AUC diff | PR AUC diff |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def ci(r: dict[str, Any], m: str) -> str:
            return f"{r[m]:.4f} [{r[m + '_ci'][0]:.4f}, {r[m + '_ci'][1]:.4f}]" if m in r else "-"

        for name, r in cmp.items():
            lines.append(f"| {name} | {r['n']} | {r['positives']} | {ci(r, 'roc_auc')} | {ci(r, 'pr_auc')} | "
                         f"{ci(r, 'log_loss')} | {r['ece']:.4f} | {ci(r, 'roc_auc_diff')} | {ci(r, 'pr_auc_diff')} |")
        lines += ["", f"Cross-fitting folds chose: {metrics.get('crossfit_chosen')}",
                  f"Served blend: {metrics.get('served_blend_note')}", "",
                  f"Model: `{json.dumps(metrics.get('model'))}`\n"]
    if metrics.get("partial"):
        lines.append(f"**Partial run**: {metrics['partial']}\n")
    lines.append("![calibration](calibration.png)\n")
    return "\n".join(lines)


def _score_sample(d: Path, config: dict[str, Any], metrics: dict[str, Any], seed: int) -> None:
    """The sample's comparison from cases.jsonl (and the served blend in `config`): metrics and scores.jsonl."""
    recs = list(_done_cases(d).values())
    ok = [r for r in recs if r.get("p_model") is not None]
    metrics["model"] = _model_summary(recs)
    ys, bs, ms = [r["label"] for r in ok], [r["p_base"] for r in ok], [r["p_model"] for r in ok]
    if len(set(ys)) < 2:
        metrics["sample"] = None
        metrics["sample_note"] = f"{len(ok)} model-scored cases of one class or none: no comparison"
        return
    sb = config.get("served_blend")
    served = None if sb is None else ServedChurnBlend(Stack(**sb["stack"]) if sb["stack"] else None, sb["note"])
    cmp, scores, chosen = churn_compare(ys, bs, ms, served=served, seed=seed)
    metrics.update(sample=cmp, crossfit_chosen=chosen,
                   served_blend_note=sb["note"] if sb else config.get("served_blend_note"))
    with (d / "scores.jsonl").open("w", encoding="utf-8") as fh:
        for i, r in enumerate(ok):
            fh.write(json.dumps({"case_id": r["case_id"], "label": r["label"], **{k: v[i] for k, v in scores.items()}})
                     + "\n")


def run_churn_eval(settings: Settings, *, n_model: int = 150, seed: int = 0, out: Path | None = None,
                   n_explain: int = 10, budget_s: float | None = None, dataset: str = "online-retail",
                   horizon_days: int = 90) -> Path:
    """Churn: the RFM baseline on every test buyer, the model on a sample, compared there (see
    the module docstring). Writes and returns the run folder.

    Raises:
        ValueError: an unknown dataset, no buyers, or one class only (the message names the flag).
    """
    rt = Runtime(settings)
    store, ds = rt.store, dataset
    require_dataset(store, ds)
    train_as_of, as_of = churn_cutoffs(robust_end(store, ds), ds, horizon_days)
    catalog = store.items(ds)
    prices = catalogue_prices(catalog)
    train = churn_rows(store, ds, train_as_of, horizon_days, catalog)
    test = churn_rows(store, ds, as_of, horizon_days, catalog)
    base = _fit(fit_churn_baseline, train, f"{ds} users at {train_as_of:%Y-%m-%d}, {horizon_days} d",
                "--horizon-days (churn rows need purchases)")
    if not test:
        raise ValueError(f"no {ds} buyers before {as_of:%Y-%m-%d}; try another --horizon-days")
    fitted = load_churn_blend(settings.index_dir(ds), ds, horizon_days)
    served, note = served_for_eval(fitted, model=rt.model_identity(), prompt=prompt_id(PROB_PROMPT), baseline=base,
                                   test_as_of=as_of)
    d = _run_dir("churn", out, settings.workspace)
    y = [r.label for r in test]
    pb_all = [base.predict(rfm_vector(r.features)) for r in test]
    metrics: dict[str, Any] = {"baseline_all": binary_metrics(y, pb_all)}
    config: dict[str, Any] = {
        "task": "churn", "seed": seed, "n_model": n_model, "baseline": asdict(base) | {"blend": None},
        "prompts": _prompt_refs([PROB_PROMPT, "churn_explain.v1"]), "dataset": ds, "train_as_of": train_as_of,
        "test_as_of": as_of, "horizon_days": horizon_days, "n_train": len(train),
        "train_churn_rate": sum(r.label for r in train) / len(train), "n_test": len(test),
        "test_churn_rate": sum(r.label for r in test) / len(test), "served_blend_note": note,
        "served_blend": None if fitted is None or served is None else {
            "file": blend_file(horizon_days), "sha256": fitted.sha256(), "as_of": fitted.as_of,
            "stack": asdict(served.stack) if served.stack else None, "note": served.note}}

    async def predict(model: Any, r: Any, explain: bool) -> dict[str, Any]:
        evs = store.user_events(ds, r.user_id, before=as_of)
        p = await ChurnService(model, base, explain=explain, blend=served).predict(
            r.user_id, evs, catalog, as_of=as_of, dataset=ds, horizon_days=horizon_days, prices=prices)
        return {"label": r.label, "p_base": p.baseline_probability, "p_model": p.model_probability,
                "p_final": p.probability, "explained": explain, "risk_band": p.risk_band, "action": p.action,
                "reason": p.reason, "reason_source": p.reason_source, "evidence": [e.event_id for e in p.evidence],
                "meta": p.meta.model_dump(mode="json")}

    series = {"baseline (all)": (y, pb_all)}
    pick = _sample(test, n_model, seed, None) if n_model else []

    async def model_part() -> None:
        try:
            if pick:
                # case id "<user>|": the id earlier churn runs recorded, so their cases.jsonl resumes
                todo = [(f"{test[i].user_id}|", test[i]) for i in pick]
                await _model_cases(d, rt, todo, predict, n_explain, budget_s)
        finally:
            await rt.aclose()

    asyncio.run(model_part())
    if pick:
        recs = list(_done_cases(d).values())
        metas = [r["meta"] for r in recs if "meta" in r]
        config.update(model_id=metas[0]["model_id"] if metas else None, model_sha256=rt.model_sha256)
        metrics["partial"] = f"{len(recs)} of {len(pick)} sampled cases scored" if len(recs) < len(pick) else None
        _score_sample(d, config, metrics, seed)
        scored = read_jsonl(d / "scores.jsonl") if metrics.get("sample") else []
        for name in SCORERS:
            if scored and name in scored[0]:
                series[f"{name} (sample)"] = ([r["label"] for r in scored], [r[name] for r in scored])
    _plot_calibration(d / "calibration.png", series, "churn")
    return _write(d, config, metrics, _report(config, metrics))


def rescore(run_dir: Path) -> dict[str, Any]:
    """Recompute a churn run's sample comparison from cases.jsonl and config.json (no model, no
    dataset): the baseline's all-buyer metrics are kept from metrics.json.

    Raises:
        FileNotFoundError: no config.json.
    """
    d = Path(run_dir)
    config = json.loads((d / "config.json").read_text())
    old = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {}
    metrics: dict[str, Any] = {k: old[k] for k in ("baseline_all", "partial") if k in old}
    _score_sample(d, config, metrics, int(config.get("seed", 0)))
    _write(d, config, metrics, _report(config, metrics))
    return metrics
