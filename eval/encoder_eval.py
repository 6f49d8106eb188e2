"""``shoplens eval intent --scorers baseline,bert,llm,blend``: the fine-tuned encoder beside the LLM.

Protocol (issue 19; the definitions of ``shoplens eval intent``):

* Test cases: the purchase (or click) cases at the eval's test cut-off (Taobao: 2017-12-02
  00:00 China time, 48 h horizon; another dataset: `derived_cutoffs`). For purchase these are
  exactly ``eval intent``'s pairs, with the same ``user|item`` case ids, so its LLM cases
  (``--llm-cases``) plug in. Scored: every positive and ``test_negatives`` random negatives
  (weighted back to the natural balance; ROC AUC is unaffected by the subsampling).
* Training cases: the same task at ``n_cutoffs`` daily cut-offs ending at the training cut-off
  (labels end where the test features begin).
* Users are cross-fitted in ``folds`` folds (`user_fold`): the model that scores a fold's test
  cases was trained and validated on the other folds' users only (80% train, 20% validation by
  `user_split`), so no user is in two splits of any model and every test case is scored.
* Scorers: ``baseline`` (the funnel logistic regression fitted on the same training cases),
  ``baseline_1cut`` (the published protocol: one cut-off, every user), ``bert`` (the fine-tuned
  encoder), ``blend`` (the stack chosen on validation, `agent.tasks.stack`), ``llm`` (the
  packaged model's yes/no verbalizer, on a sample of at least 300 cases, positives oversampled to
  a third, the same sample as ``eval intent --cases N``), ``blend_llm`` (baseline + bert + llm,
  cross-fitted by user fold on that sample).
* Metrics (`agent.tasks.binary_stats.compare_scorers`): ROC AUC, PR AUC, log loss, ECE, each with a 95%
  stratified bootstrap interval, and the paired difference from ``baseline``; cost (training
  seconds, inference ms per case).
* The data-size curve (``curve``): encoders and baselines trained on 100 ... 10k labelled cases
  (positives oversampled to at most a quarter), tested on fold 0's test cases and on its part of
  the LLM sample, beside the LLM's zero-shot line: ``curve.png``.

Writes ``runs/<ts>-<task>-scorers/``: config.json, metrics.json, report.md, scores.jsonl (every
scored case's probabilities, so paired differences can be recomputed without any model),
cases.jsonl (the LLM's raw records; a re-run resumes), curve.jsonl + curve.png, and the fold
models (``fold-<k>/``; a re-run with the same ``--out`` reuses them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import numpy as np

from agent.app.runtime import Runtime
from agent.domain.errors import ArtifactMismatchError
from agent.settings import Settings
from agent.tasks.binary_stats import compare_scorers
from agent.tasks.encoder import FineTuneConfig, FitProgress
from agent.tasks.encoder_cases import (
    EncoderCase,
    EncoderTask,
    build_cases,
    subsample,
    training_cutoffs,
    user_fold,
    user_split,
)
from agent.tasks.encoder_train import (
    VAL_NEG_PER_POS,
    TrainedEncoder,
    encoder_manifest,
    fit_blend,
    fit_case_baseline,
    fit_encoder,
    load_trained,
    save_trained,
)
from agent.tasks.intent import IntentService, Scorer
from agent.tasks.stack import Stack
from eval.runs import git_commit, read_jsonl
from eval.tasks_eval import (
    INTENT_HORIZON_H,
    INTENT_TEST_CUTOFF,
    INTENT_TRAIN_CUTOFF,
    _model_cases,
    _run_dir,
    _sample,
    derived_cutoffs,
    intent_case_record,
    require_dataset,
)

log = logging.getLogger(__name__)
ALL_SCORERS: tuple[str, ...] = get_args(Scorer)  # the scorers intent serves, in one place
# Eval-only: the model few-shot over the encoder's own case texts (not served: see the docs' table).
EVAL_SCORERS: tuple[str, ...] = ("llm_fewshot",)
FEWSHOT_PROMPT = "purchase_intent_fewshot.v1"
FEWSHOT_K = 8  # demonstrations per fold: half buys, half not


@dataclass
class ScorersConfig:
    """What `run_scorers_eval` runs; every field is written to config.json."""

    dataset: str = "taobao"
    task: EncoderTask = "purchase"
    scorers: tuple[str, ...] = ALL_SCORERS
    horizon_hours: float = INTENT_HORIZON_H
    n_cutoffs: int = 5  # daily training cut-offs ending at the training cut-off
    folds: int = 2
    test_negatives: int | None = 4000  # None: every test negative
    n_llm: int = 300
    llm_cases: str | None = None  # cases.jsonl of an ``eval intent`` run with the same sample
    budget_s: float | None = None
    neg_per_pos: float = 20
    seed: int = 0
    curve: tuple[int, ...] = ()
    curve_max_steps: int = 100  # per curve point: small sets stop earlier (4 epochs), large ones here
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)


def _cutoffs(rt: Runtime, cfg: ScorersConfig) -> tuple[list[datetime], datetime]:
    if cfg.dataset == "taobao" and cfg.horizon_hours == INTENT_HORIZON_H:
        train_cut, test_cut = INTENT_TRAIN_CUTOFF, INTENT_TEST_CUTOFF
    else:
        train_cut, test_cut = derived_cutoffs(rt.store, cfg.dataset, timedelta(hours=cfg.horizon_hours))
    return training_cutoffs(train_cut, cfg.n_cutoffs), test_cut


def _fold_split(pool: list[EncoderCase], k: int, cfg: ScorersConfig
                ) -> tuple[list[EncoderCase], list[EncoderCase], list[EncoderCase]]:
    """(the other folds' cases, their training users' cases (80%), their validation users' (20%))."""
    others = [c for c in pool if user_fold(c.user_id, cfg.folds, cfg.seed) != k]
    split = {u: user_split(u, cfg.seed, train=0.8, val=0.2) for u in {c.user_id for c in others}}
    return (others, [c for c in others if split[c.user_id] == "train"],
            [c for c in others if split[c.user_id] != "train"])


def _fold_model(d: Path, k: int, cfg: ScorersConfig, pool: list[EncoderCase], *, progress: bool) -> TrainedEncoder:
    """Fold k's model: trained on the other folds' users (reused from ``fold-<k>/`` when there)."""
    folder = d / f"fold-{k}"
    fix = f"delete {folder} to retrain"
    others, train, val = _fold_split(pool, k, cfg)
    if (folder / "manifest.json").exists():
        try:
            fitted = load_trained(folder, cfg.dataset, cfg.task, fix)
        except ArtifactMismatchError as e:
            log.warning("%s; retraining", e)
        else:  # the blend is re-chosen with the current rule (Stack.fit) on the same validation cases
            va, vw = subsample(val, VAL_NEG_PER_POS, cfg.seed + 1)
            fitted.stack = fit_blend(fitted.clf, fitted.baseline, va, vw, cfg.seed)
            return fitted
    fitted = fit_encoder(train, val, cfg.finetune, neg_per_pos=cfg.neg_per_pos, seed=cfg.seed,
                         work_dir=Path(str(folder) + ".work"), progress=_bar(f"fold {k}") if progress else None,
                         trained_on=f"{cfg.dataset} {cfg.task} training cases of folds != {k}")
    save_trained(fitted, folder, encoder_manifest(
        fitted, dataset=cfg.dataset, task=cfg.task, cutoffs=sorted({c.cutoff for c in pool}), horizon_h=cfg.horizon_hours,
        seed=cfg.seed, neg_per_pos=cfg.neg_per_pos, cases=others, split={"train": train, "val": val}, test_metrics={}))
    return fitted


def _bar(desc: str) -> FitProgress:
    return FitProgress(f"fine-tuning {desc}")


def _curve_sample(cases: Sequence[EncoderCase], n: int, seed: int) -> list[EncoderCase]:
    """`n` labelled cases with positives oversampled to at most a quarter (all there are, if fewer)."""
    rng = random.Random(seed)
    pos = [c for c in cases if c.label == 1]
    neg = [c for c in cases if c.label == 0]
    k = min(len(pos), n // 4)
    pick = rng.sample(pos, k) + rng.sample(neg, min(len(neg), n - k))
    rng.shuffle(pick)
    return pick


def _llm_records(d: Path, cfg: ScorersConfig) -> dict[str, dict[str, Any]]:
    """case id (``user|item``) -> the model's recorded case (``--llm-cases``, then this run's cases.jsonl)."""
    got: dict[str, dict[str, Any]] = {}
    for src in ([Path(cfg.llm_cases)] if cfg.llm_cases else []) + [d / "cases.jsonl"]:
        for r in read_jsonl(src) if src.exists() else []:
            if r.get("p_model") is not None:
                got[r["case_id"]] = r
    return got


def _llm_scores(settings: Settings, d: Path, cfg: ScorersConfig, rt: Runtime, sample: list[EncoderCase],
                test_cut: datetime, baseline_1cut: Any) -> dict[str, float]:
    """case id (``user|item``) -> the model's P(yes), from ``--llm-cases`` and/or new model calls
    (recorded in this run's cases.jsonl; a re-run resumes)."""
    got = {k: float(r["p_model"]) for k, r in _llm_records(d, cfg).items()}
    todo = [(f"{c.user_id}|{c.item_id}", c) for c in sample if f"{c.user_id}|{c.item_id}" not in got]
    if todo and cfg.budget_s != 0:
        catalog = rt.store.items(cfg.dataset)

        async def predict(model: Any, c: EncoderCase, explain: bool) -> dict[str, Any]:
            evs = rt.store.user_events(cfg.dataset, c.user_id, before=test_cut)
            p = await IntentService(model, baseline_1cut, explain=False).predict(
                c.user_id, c.item_id, evs, catalog, as_of=test_cut, horizon_hours=cfg.horizon_hours, dataset=cfg.dataset)
            return intent_case_record(c.label, p, False)

        async def go() -> None:
            try:
                await _model_cases(d, rt, todo, predict, 0, cfg.budget_s)
            finally:
                await rt.aclose()
        asyncio.run(go())
        got = {k: float(r["p_model"]) for k, r in _llm_records(d, cfg).items()}
    return got


def fewshot_demos(pool: list[EncoderCase], k: int, cfg: ScorersConfig, n: int = FEWSHOT_K) -> list[EncoderCase]:
    """Fold k's demonstrations: `n` cases (half positive) of the other folds' training users,
    drawn with the seed; shuffled once, the same for every case of the fold (a stable prefix)."""
    _, train, _ = _fold_split(pool, k, cfg)
    rng = random.Random(cfg.seed * 1000 + k)
    pos = [c for c in train if c.label == 1]
    neg = [c for c in train if c.label == 0]
    if len(pos) < n // 2 or len(neg) < n - n // 2:
        raise ValueError(f"fold {k}: {len(pos)} positive and {len(neg)} negative training cases; "
                         f"{n} demonstrations need {n // 2} of each")
    demos = rng.sample(pos, n // 2) + rng.sample(neg, n - n // 2)
    rng.shuffle(demos)
    return demos


def fewshot_messages(demos: Sequence[EncoderCase], case: EncoderCase, horizon_hours: float) -> list[Any]:
    """The few-shot verbalizer's messages (`FEWSHOT_PROMPT`): demonstrations, then `case`."""
    from agent.llm.prompting import load_prompt, render

    return render(load_prompt(FEWSHOT_PROMPT), horizon_hours=f"{horizon_hours:g}", case=case.text,
                  demos=[{"text": d.text, "answer": "yes" if d.label else "no"} for d in demos])


def _fewshot_scores(settings: Settings, d: Path, cfg: ScorersConfig, pool: list[EncoderCase],
                    sample: list[EncoderCase]) -> dict[str, float]:
    """case id -> the model's few-shot P(yes) on `sample` (recorded in fewshot.jsonl; resumes).
    Cases run fold by fold so each fold's demonstration prefix is evaluated once."""
    from agent.llm.structured import CallTrace
    from agent.tasks.common import ask_yes_no

    demos = {k: fewshot_demos(pool, k, cfg) for k in range(cfg.folds)}
    todo = sorted(((c.case_id, c) for c in sample), key=lambda t: user_fold(t[1].user_id, cfg.folds, cfg.seed))
    rt = Runtime(settings)

    async def predict(model: Any, c: EncoderCase, _explain: bool) -> dict[str, Any]:
        k = user_fold(c.user_id, cfg.folds, cfg.seed)
        trace = CallTrace()
        p = await ask_yes_no(model, fewshot_messages(demos[k], c, cfg.horizon_hours), trace)
        return {"label": c.label, "fold": k, "p_model": p, "prompt": FEWSHOT_PROMPT,
                "prompt_tokens": trace.usage.prompt_tokens, "demos": [x.case_id for x in demos[k]]}

    async def go() -> None:
        try:
            await _model_cases(d, rt, todo, predict, 0, cfg.budget_s, file="fewshot.jsonl")
        finally:
            await rt.aclose()
    asyncio.run(go())
    recs = read_jsonl(d / "fewshot.jsonl") if (d / "fewshot.jsonl").exists() else []
    return {r["case_id"]: float(r["p_model"]) for r in recs if r.get("p_model") is not None}


def run_scorers_eval(settings: Settings, cfg: ScorersConfig, out: Path | None = None,
                     progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run the side-by-side eval (see the module doc); returns (run folder, metrics).

    Raises:
        ValueError: an unknown dataset or scorer, no cases, or one class only in a split.
    """
    bad = set(cfg.scorers) - set(ALL_SCORERS) - set(EVAL_SCORERS)
    if bad:
        raise ValueError(f"--scorers: unknown {', '.join(sorted(bad))}; choose from "
                         f"{', '.join(ALL_SCORERS + EVAL_SCORERS)}")
    rt = Runtime(settings)
    store, ds = rt.store, cfg.dataset
    require_dataset(store, ds)
    d = _run_dir(f"{cfg.task}-scorers", out, settings.workspace)
    train_cuts, test_cut = _cutoffs(rt, cfg)
    catalog = store.items(ds)
    t0 = time.perf_counter()
    test_all = build_cases(store, ds, cfg.task, [test_cut], cfg.horizon_hours, catalog, seed=cfg.seed)
    pool = build_cases(store, ds, cfg.task, train_cuts, cfg.horizon_hours, catalog, seed=cfg.seed)
    if not test_all or not pool:
        raise ValueError(f"{ds}: no {cfg.task} cases ({len(pool)} training, {len(test_all)} test); "
                         "try another --horizon-hours or --dataset")
    build_s = time.perf_counter() - t0
    log.info("%d training cases (%d positive), %d test cases (%d positive), built in %.0f s", len(pool),
             sum(c.label for c in pool), len(test_all), sum(c.label for c in test_all), build_s)
    # the test cases scored: every positive, a random share of negatives, and the LLM sample
    rng = random.Random(cfg.seed)
    n_neg = sum(1 for c in test_all if c.label == 0)
    rate = 1.0 if cfg.test_negatives is None else min(1.0, cfg.test_negatives / max(1, n_neg))
    in_sub = [c.label == 1 or rng.random() < rate for c in test_all]
    wants_llm = {"llm", "llm_fewshot"} & set(cfg.scorers)
    sample = [test_all[i] for i in _sample(test_all, cfg.n_llm, cfg.seed, 1 / 3)] if wants_llm else []
    sample_ids = {c.case_id for c in sample}
    scored = [c for c, s in zip(test_all, in_sub, strict=True) if s or c.case_id in sample_ids]
    sub_ids = {c.case_id for c, s in zip(test_all, in_sub, strict=True) if s}
    last = [c for c in pool if c.cutoff == train_cuts[-1]]
    base_1cut = fit_case_baseline(last, f"{ds} {cfg.task} cases at {train_cuts[-1]:%Y-%m-%d %H:%M}, every user")
    probs: dict[str, dict[str, float]] = {c.case_id: {"baseline_1cut": base_1cut.predict(c.funnel.vector())}
                                          for c in scored}
    cost: dict[str, Any] = {"case_building_s": round(build_s, 1), "train_s": {}, "ms_per_case": {}}
    folds: dict[str, int] = {}
    for k in range(cfg.folds):
        fitted = _fold_model(d, k, cfg, pool, progress=progress)
        mine = [c for c in scored if user_fold(c.user_id, cfg.folds, cfg.seed) == k]
        t1 = time.perf_counter()
        sc = fitted.scores(mine)
        cost["ms_per_case"][f"fold{k}_all_scorers"] = round(1000 * (time.perf_counter() - t1) / max(1, len(mine)), 2)
        cost["train_s"][f"fold{k}"] = fitted.manifest.get("history", {}).get("seconds") if fitted.manifest else None
        cost[f"fold{k}_blend"] = fitted.stack.describe()
        for i, c in enumerate(mine):
            probs[c.case_id].update({name: float(v[i]) for name, v in sc.items()})
            folds[c.case_id] = k
    t1 = time.perf_counter()
    for c in scored[:500]:
        base_1cut.predict(c.funnel.vector())
    cost["ms_per_case"]["baseline"] = round(1000 * (time.perf_counter() - t1) / max(1, min(500, len(scored))), 4)
    llm: dict[str, float] = {}
    few: dict[str, float] = {}
    if sample and "llm_fewshot" in cfg.scorers:
        few = _fewshot_scores(settings, d, cfg, pool, sample)
        secs = [r["seconds"] for r in read_jsonl(d / "fewshot.jsonl") if "seconds" in r]
        cost["ms_per_case"]["llm_fewshot_median"] = round(1000 * float(np.median(secs)), 1) if secs else None
    if sample and "llm" in cfg.scorers:
        llm = _llm_scores(settings, d, cfg, rt, sample, test_cut, base_1cut)
        wanted = {f"{c.user_id}|{c.item_id}" for c in sample}
        secs = [r["seconds"] for k, r in _llm_records(d, cfg).items() if k in wanted and "seconds" in r]
        cost["ms_per_case"]["llm_median"] = round(1000 * float(np.median(secs)), 1) if secs else None
    main = [c for c in scored if c.case_id in sub_ids]
    names = [n for n in ("baseline", "baseline_1cut", "bert", "blend") if n in cfg.scorers or n == "baseline_1cut"]
    wts = [1.0 if c.label == 1 else 1.0 / rate for c in main]
    metrics: dict[str, Any] = {
        "all": {"scorers": compare_scorers([c.label for c in main], {n: [probs[c.case_id][n] for c in main] for n in names},
                                           weights=wts, reference="baseline", seed=cfg.seed),
                "by_fold": by_fold([{"fold": folds.get(c.case_id), "label": c.label, **probs[c.case_id]} for c in main], names),
                "n_test_cases": len(test_all), "test_positives": sum(c.label for c in test_all),
                "scored": len(main), "negatives_rate": round(rate, 5)},
        "cost": cost,
    }
    zero = "llm" in cfg.scorers
    have = [c for c in sample if c.case_id in probs and (not zero or f"{c.user_id}|{c.item_id}" in llm)
            and ("llm_fewshot" not in cfg.scorers or c.case_id in few)]
    if have:
        for c in have:
            if zero:
                probs[c.case_id]["llm"] = llm[f"{c.user_id}|{c.item_id}"]
            if c.case_id in few:
                probs[c.case_id]["llm_fewshot"] = few[c.case_id]
        if zero:
            _blend_llm(have, probs, cfg)
        sn = names + (["llm", "blend_llm"] if zero else []) + (["llm_fewshot"] if few else [])
        metrics["llm_sample"] = {"scorers": compare_scorers([c.label for c in have],
                                                            {n: [probs[c.case_id][n] for c in have] for n in sn},
                                                            reference="baseline", seed=cfg.seed),
                                 "asked": len(sample), "answered": len(have),
                                 "sample": "positives oversampled to 1/3 (the eval intent sample)"}
    if cfg.curve:
        metrics["curve"] = _curve(d, cfg, pool, [c for c in scored if c.case_id in sub_ids], have, probs, rate, progress)
    with (d / "scores.jsonl").open("w") as fh:
        for c in scored:
            fh.write(json.dumps({"case_id": c.case_id, "label": c.label, "fold": folds.get(c.case_id),
                                 "in_main": c.case_id in sub_ids, "in_llm_sample": c.case_id in sample_ids,
                                 **probs[c.case_id]}) + "\n")  # full precision: rounding makes AUC ties
    config = {"kind": "intent_scorers", "git_commit": git_commit(), **asdict(cfg), "train_cutoffs": train_cuts,
              "test_cutoff": test_cut, "n_pool": len(pool), "pool_positives": sum(c.label for c in pool)}
    (d / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (d / "report.md").write_text(report(config, metrics))
    return d, metrics


def _blend_llm(have: list[EncoderCase], probs: dict[str, dict[str, float]], cfg: ScorersConfig) -> None:
    """``blend_llm``: the stack over baseline, bert and llm, cross-fitted by user fold on the sample."""
    for k in range(cfg.folds):
        tr = [c for c in have if user_fold(c.user_id, cfg.folds, cfg.seed) != k]
        te = [c for c in have if user_fold(c.user_id, cfg.folds, cfg.seed) == k]
        if not te:
            continue
        try:
            st = Stack.fit([c.label for c in tr], {m: [probs[c.case_id][m] for c in tr] for m in ("baseline", "bert", "llm")},
                           seed=cfg.seed)
        except ValueError:  # one class in the other fold: the baseline alone
            for c in te:
                probs[c.case_id]["blend_llm"] = probs[c.case_id]["baseline"]
            continue
        for c in te:
            probs[c.case_id]["blend_llm"] = st.predict(probs[c.case_id])


def _curve(d: Path, cfg: ScorersConfig, pool: list[EncoderCase], main: list[EncoderCase], have: list[EncoderCase],
           probs: dict[str, dict[str, float]], rate: float, progress: bool) -> list[dict[str, Any]]:
    """Encoder and baseline AUC by training-set size, on fold 0's test cases and LLM-sample cases."""
    _, train, val = _fold_split(pool, 0, cfg)
    test = [c for c in main if user_fold(c.user_id, cfg.folds, cfg.seed) == 0]
    llm_test = [c for c in have if user_fold(c.user_id, cfg.folds, cfg.seed) == 0]
    rows = []
    done = {r["n"]: r for r in read_jsonl(d / "curve.jsonl")} if (d / "curve.jsonl").exists() else {}
    few_line = None
    if llm_test and all("llm_fewshot" in probs[c.case_id] for c in llm_test) and len({c.label for c in llm_test}) == 2:
        few_line = compare_scorers([c.label for c in llm_test], {n: [probs[c.case_id][n] for c in llm_test]
                                                                 for n in ("baseline", "llm_fewshot")},
                                   reference="baseline", n_boot=500, seed=cfg.seed)["llm_fewshot"]
    for n in cfg.curve:
        if n in done:
            rows.append(done[n] | ({"llm_fewshot_line": few_line} if few_line else {}))
            continue
        cases = _curve_sample(train, n, cfg.seed)
        ft = FineTuneConfig(**(asdict(cfg.finetune) | {"max_steps": cfg.curve_max_steps}))
        fitted = fit_encoder(cases, val, ft, neg_per_pos=1e9, seed=cfg.seed, progress=_bar(f"curve n={n}") if progress else None,
                             trained_on=f"curve n={n}")
        row: dict[str, Any] = {"n": n, "positives": sum(c.label for c in cases), "steps": fitted.history.steps if fitted.history else None,
                               "train_s": fitted.history.seconds if fitted.history else None}
        if few_line:
            row["llm_fewshot_line"] = few_line
        for part, cs in (("test", test), ("llm_sample", llm_test)):
            if len({c.label for c in cs}) < 2:
                continue
            sc = fitted.scores(cs)
            ys = [c.label for c in cs]
            w = [1.0 if c.label == 1 else 1.0 / rate for c in cs] if part == "test" else None
            scores = {"bert": sc["bert"].tolist(), "baseline": sc["baseline"].tolist()}
            if part == "llm_sample":
                if all("llm" in probs[c.case_id] for c in cs):
                    scores["llm"] = [probs[c.case_id]["llm"] for c in cs]
                if all("llm_fewshot" in probs[c.case_id] for c in cs):
                    scores["llm_fewshot"] = [probs[c.case_id]["llm_fewshot"] for c in cs]
            row[part] = compare_scorers(ys, scores, weights=w, reference="baseline", n_boot=500, seed=cfg.seed)
        rows.append(row)
        with (d / "curve.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    _plot_curve(d / "curve.png", rows, cfg)
    return rows


def _plot_curve(path: Path, rows: list[dict[str, Any]], cfg: ScorersConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for part, style in (("llm_sample", "--"), ("test", "-")):
        pts = [r for r in rows if part in r]
        if not pts:
            continue
        for name, color in (("bert", "C0"), ("baseline", "C1")):
            xs = [r["n"] for r in pts]
            ys = [r[part][name]["roc_auc"] for r in pts]
            lo = [r[part][name]["roc_auc"] - r[part][name]["roc_auc_ci"][0] for r in pts]
            hi = [r[part][name]["roc_auc_ci"][1] - r[part][name]["roc_auc"] for r in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o" + style, color=color, capsize=3,
                        label=f"{'fine-tuned BERT' if name == 'bert' else 'logistic baseline'} ({part.replace('_', ' ')})")
        if part == "llm_sample" and "llm" in pts[0][part]:
            m = pts[0][part]["llm"]
            ax.axhline(m["roc_auc"], color="C2", ls=":", label=f"LLM zero-shot (llm sample, n={m['n']})")
            ax.axhspan(m["roc_auc_ci"][0], m["roc_auc_ci"][1], color="C2", alpha=0.12)
        few = next((r["llm_fewshot_line"] for r in rows if "llm_fewshot_line" in r), None)
        if part == "llm_sample" and few:
            ax.axhline(few["roc_auc"], color="C3", ls="-.", label=f"LLM few-shot, {FEWSHOT_K} demos (llm sample, n={few['n']})")
            ax.axhspan(few["roc_auc_ci"][0], few["roc_auc_ci"][1], color="C3", alpha=0.10)
    ax.set_xscale("log")
    ax.set(xlabel="labelled training cases (positives oversampled to <= 1/4)", ylabel="ROC AUC (95% CI)",
           title=f"{cfg.dataset} {cfg.task} within {cfg.horizon_hours:g} h: fine-tuned encoder vs the LLM")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """report.md: one table per case set (scorer, n, ROC AUC [CI], PR AUC [CI], log loss, ECE, ΔAUC [CI])."""
    def table(block: dict[str, Any]) -> list[str]:
        lines = ["| scorer | n (pos) | ROC AUC [95% CI] | PR AUC [95% CI] | log loss | ECE | ROC AUC − baseline [95% CI] |",
                 "|---|---|---|---|---|---|---|"]
        for name, m in block["scorers"].items():
            diff = (f"{m['roc_auc_diff']:+.4f} [{m['roc_auc_diff_ci'][0]:+.4f}, {m['roc_auc_diff_ci'][1]:+.4f}]"
                    if "roc_auc_diff" in m else "—")
            lines.append(f"| {name} | {m['n']} ({m['positives']}) | {m['roc_auc']:.4f} [{m['roc_auc_ci'][0]:.4f}, "
                         f"{m['roc_auc_ci'][1]:.4f}] | {m['pr_auc']:.4f} [{m['pr_auc_ci'][0]:.4f}, {m['pr_auc_ci'][1]:.4f}] | "
                         f"{m['log_loss']:.4f} | {m['ece']:.4f} | {diff} |")
        return lines

    def fold_table(folds: dict[str, Any]) -> list[str]:
        if not folds:
            return []
        names = [k for k in next(iter(folds.values())) if k not in ("n", "positives")]
        return ["ROC AUC within each user fold (one model per fold, as served; the pooled table mixes two "
                "fold models' calibrations):", "", "| fold | n (pos) | " + " | ".join(names) + " |",
                "|---|---|" + "---|" * len(names),
                *[f"| {k} | {v['n']} ({v['positives']}) | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |"
                  for k, v in folds.items()], ""]

    out = [f"# {config['dataset']} {config['task']} within {config['horizon_hours']:g} h: scorers side by side", "",
           f"Test cut-off {config['test_cutoff']}; training cut-offs {', '.join(str(c) for c in config['train_cutoffs'])}; "
           f"{config['folds']} user folds (cross-fitted); commit {config['git_commit']}.", "",
           "## All test cases (every positive, negatives subsampled and weighted)", "", *table(metrics["all"]), "",
           *fold_table(metrics["all"].get("by_fold", {}))]
    if "llm_sample" in metrics:
        out += ["## The LLM sample (positives oversampled to 1/3)", "", *table(metrics["llm_sample"]), ""]
    out += ["## Cost", "", "```", json.dumps(metrics.get("cost", {}), indent=2), "```", ""]
    if "curve" in metrics:
        out += ["## Data-size curve", "", "![curve](curve.png)", ""]
    return "\n".join(out)


def by_fold(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """ROC AUC of each scorer within each user fold (rows of scores.jsonl with ``fold``, ``label``).

    Each fold's cases were scored by one model, as a served model scores every case; the pooled
    figures mix two fold models, so a per-fold recalibration (a Platt map fitted on that fold's
    validation users) changes the pooled ranking even when it keeps each fold's ranking: a blend
    that chose the baseline alone ties it within every fold and can still differ pooled."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, dict[str, Any]] = {}
    for k in sorted({r["fold"] for r in rows if r.get("fold") is not None}):
        rs = [r for r in rows if r.get("fold") == k]
        y = [int(r["label"]) for r in rs]
        if len(set(y)) < 2:
            continue
        out[f"fold{k}"] = {"n": len(rs), "positives": sum(y),
                           **{n: round(float(roc_auc_score(y, [r[n] for r in rs])), 4) for n in names if n in rs[0]}}
    return out


def rescore(run_dir: Path) -> dict[str, Any]:
    """Recompute metrics.json and report.md from ``scores.jsonl`` alone (no model, no encoder):
    the main set (``in_main``, negatives weighted back by the recorded rate) and the LLM sample.

    Raises:
        FileNotFoundError: no scores.jsonl or config.json in `run_dir`.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    rows = read_jsonl(run_dir / "scores.jsonl")
    rate = old.get("all", {}).get("negatives_rate") or 1.0
    main = [r for r in rows if r["in_main"]]
    names = [n for n in ("baseline", "baseline_1cut", "bert", "blend") if main and n in main[0]]
    metrics: dict[str, Any] = dict(old)
    metrics["all"] = dict(old.get("all", {})) | {"scorers": compare_scorers(
        [r["label"] for r in main], {n: [r[n] for r in main] for n in names},
        weights=[1.0 if r["label"] else 1.0 / rate for r in main], reference="baseline", seed=config.get("seed", 0)),
        "by_fold": by_fold(main, names)}
    sample = [r for r in rows if r["in_llm_sample"] and "llm" in r]
    if sample:
        sn = names + [n for n in ("llm", "blend_llm", "llm_fewshot") if n in sample[0]]
        metrics["llm_sample"] = dict(old.get("llm_sample", {})) | {"scorers": compare_scorers(
            [r["label"] for r in sample], {n: [r[n] for r in sample] for n in sn}, reference="baseline",
            seed=config.get("seed", 0))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (run_dir / "report.md").write_text(report(config, metrics))
    return metrics
