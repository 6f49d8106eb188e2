"""The offline next-item harness: a configuration in, a reproducible run folder out.

``run_next_item(config)`` checks the configuration (:func:`eval.run_checks.check_config`: nothing is
created for one that cannot run), builds the cases of one protocol (:func:`build_suite`), builds
the ranker, ranks every case and writes ``<workspace>/runs/<timestamp>-<name>/`` (or ``--out``):

* ``config.json``: protocol, dataset, candidate source, users, seed, ranker, prompt ref + sha,
  model id + sha256, git commit, and what was fitted on what.
* ``prompt_sample.txt``: one rendered prompt (LLM rankers).
* ``cases.jsonl``: one line per case (candidates in shown order, target, raw responses,
  scores, ranking, valid flag, tokens, latency). An interrupted run resumes from it.
* ``metrics.json``, ``report.md`` + ``ndcg_at_k.png`` (``eval/report.py``).

``rescore(run_dir)`` recomputes ``metrics.json`` from ``cases.jsonl`` alone; ``compare`` prints
runs side by side. Model responses are cached (``eval/cache.py``), so an unchanged re-run makes
no model calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.llm_rankers import RankOutcome
from eval.report import compute_metrics, write_report
from eval.run_checks import check_config, default_ranker
from eval.runs import git_commit, read_jsonl, run_folder
from eval.suites import Suite, _workspace, build_suite, fit_fusion, fusion_names

__all__ = ["RANKERS", "RankerSetup", "RunConfig", "Suite", "arun_next_item", "build_suite",
           "make_ranker", "read_cases", "rescore", "run_next_item"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LLM_RANKERS = ("llm", "llm-perm", "llm-generate", "llm-fewshot", "llm-pointwise", "hybrid",
               "hybrid-pointwise")
PIPELINE_RANKERS = ("pipeline",)  # the served ShopLensService.next_item (eval/pipeline.py)
BASELINE_RANKERS = ("random", "pop", "covisit", "bm25", "embedding", "fused", "fused-sasrec")
RANKERS = PIPELINE_RANKERS + BASELINE_RANKERS + LLM_RANKERS
PROMPT_FOR = {"llm-generate": "next_item_generate.v1", "llm-pointwise": "next_item_pointwise_titles.v1",
              "hybrid-pointwise": "next_item_pointwise_titles.v1"}
DEFAULT_PROMPT = "next_item_rank_titles.v1"


@dataclass
class RunConfig:
    """One evaluation run. Everything that changes a number is in here (and in config.json).

    Attributes:
        dataset: a built-in eval dataset (``amazon-games``, ``amazon-industrial``,
            ``online-retail``) or any dataset in the workspace's store.
        protocol: built-in ``llmrank`` / ``full`` (amazon-games, amazon-industrial) and Online
            Retail's ``leave-last-basket``; on any stored dataset ``leave-one-out``,
            ``leave-last-basket`` or ``temporal`` (`eval.store_protocols`).
        candidates: ``llmrank``: LLMRank's candidate file (``random``, ``bm25``, ... from
            ``Games-200/``, or ``6k-random`` / ``6k-pop``); generic protocols: ``random`` (the
            target + ``n_candidates - 1`` random untouched items), ``retrieved`` (the served
            candidate generator's top ``n_candidates``; the target may be missing) or ``full``
            (the whole catalogue).
        users: evaluate the first N users (None: all); generic protocols: a seeded sample of N
            eligible users.
        ranker: one of :data:`RANKERS`; ``pipeline`` is the served next-item pipeline
            (`eval.pipeline`), with the model unless ``no_llm``. None: `default_ranker`
            (``fused`` on the built-in protocols, ``pipeline`` on the generic ones).
        no_llm: ``pipeline`` without the model (its retrieval fusion alone).
        untrained: ``pipeline`` with the hand-set default fusion weights; otherwise the weights
            are fitted once on the pipeline store (`ShopLensService.train`, as ``shoplens
            train`` does), which holds no evaluated target.
        llm_scorer: ``pipeline``'s LLM scorer (``pointwise`` or ``verbalizer``); None: the
            served setting (``Settings.llm_scorer``), so the default run measures what users get.
        llm_weight: ``pipeline``'s model weight in the final score; None: what is served (the
            pipeline store's fitted ``llm_weight.json``, else 0: the model does not rank). Set it
            to measure the model's paired gain at a weight, beside ``no_llm``.
        fit_llm_weight: ``pipeline``: first fit the model weight on this many validation windows
            of the pipeline store (`ShopLensService.train_llm_weight`, as ``shoplens train --llm``
            does; the store holds no evaluated target), then rank with what that serves.
        prompt: prompt reference; None: the ranker's default.
        permutations: verbalizer passes (``llm-perm`` / ``hybrid``; ``llm`` always uses 1).
        position: ``shuffle`` (published protocol), ``first`` or ``last`` (position-bias check).
        hybrid_val_users: validation users (Games-6k, not in Games-200) for the hybrid weight.
        hybrid_w: fix the hybrid weight instead of choosing it on validation users.
        fewshot_k: demonstrations per prompt for ``llm-fewshot``.
        sasrec: a trained SASRec folder (``python -m eval.train_sasrec``): ``hybrid`` then
            builds on ``fused-sasrec``. Default: ``$SHOPLENS_SASREC``; ``fused-sasrec`` without
            it uses ``<workspace>/models/sasrec-games``.
        fusion_drop: ablation: refit ``fused`` / ``fused-sasrec`` / ``hybrid``'s fusion on
            validation users without this source.
        repurchase: ``full`` / ``leave-last-basket``: history items may be retrieved as
            candidates (next-basket data repeats purchases; Amazon leave-one-out does not).
        n_candidates: generic protocols: candidates per case, and the K of the served
            generator's recall@K reported beside every metric (LLMRank: 20).
        min_history: generic protocols: distinct history items a user needs to be evaluated.
        cutoff: ``temporal``: the start of the test period (ISO-8601 or unix seconds); None:
            the time before which 90% of the events lie.
        source: ``pipeline``: rank by one served source (``covisit``, ``embedding``,
            ``similar_users``, ``popularity``) instead of the fusion: its single-source ablation.
        runs_dir: where run folders go; None: ``<workspace>/runs``.
    """

    dataset: str = "amazon-games"
    protocol: str = "llmrank"
    candidates: str = "random"
    split: str = "test"
    users: int | None = 200
    ranker: str | None = None
    prompt: str | None = None
    seed: int = 2023
    position: str = "shuffle"
    permutations: int = 2
    hybrid_val_users: int = 40
    hybrid_w: float | None = None
    fewshot_k: int = 1
    sasrec: str | None = field(default_factory=lambda: os.environ.get("SHOPLENS_SASREC") or None)
    fusion_drop: str | None = None
    repurchase: bool = False
    no_llm: bool = False
    untrained: bool = False
    llm_scorer: str | None = None
    llm_weight: float | None = None
    fit_llm_weight: int | None = None
    model_profile: str | None = None
    n_candidates: int = 20
    min_history: int = 1
    cutoff: str | None = None
    source: str | None = None
    name: str | None = None
    out: Path | None = None
    runs_dir: Path | None = None
    data_dir: Path | None = None
    workspace: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ranker is None:
            self.ranker = default_ranker(self.dataset, self.protocol, self.candidates)

    @property
    def ranker_name(self) -> str:
        """The ranker (resolved in ``__post_init__``, so never None after construction)."""
        assert self.ranker is not None
        return self.ranker

    def run_name(self) -> str:
        ranker = (self.ranker_name + (f"-{self.source}" if self.source else "") + ("-no-llm" if self.no_llm else "")
                  + ("-untrained" if self.untrained else ""))
        return self.name or f"{self.dataset}-{self.protocol}-{self.candidates}-{ranker}"

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original."""
        d = asdict(self)
        for k in ("out", "runs_dir", "name", "data_dir", "workspace"):
            d.pop(k)
        for k in ("sasrec", "fusion_drop", "repurchase", "no_llm", "untrained"):  # added later: resumable
            if d[k] in (None, False):
                d.pop(k)
        for k, default in (("n_candidates", 20), ("min_history", 1), ("cutoff", None), ("source", None)):
            if d[k] == default:  # added with the generic protocols: older runs resume
                d.pop(k)
        if self.ranker != "pipeline" or self.llm_scorer is None:
            d.pop("llm_scorer")
        for k in ("llm_weight", "fit_llm_weight"):  # added later: older runs resume
            if d[k] is None:
                d.pop(k)
        return d


def _run_dir(config: RunConfig) -> Path:
    runs = Path(config.runs_dir) if config.runs_dir is not None else _workspace(config) / "runs"
    return run_folder(config.run_name(), config.out, runs, create=False)


def read_cases(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``cases.jsonl`` sorted by case index; a torn last line is dropped."""
    return sorted({r["i"]: r for r in read_jsonl(Path(run_dir) / "cases.jsonl")}.values(), key=lambda r: r["i"])


RECORD_MAX_IDS = 1000  # a whole-catalogue case records its first ranked ids and its candidate count


def case_record(i: int, case: Any, outcome: RankOutcome | None, wall_s: float,
                relevant: Sequence[str], retrieved: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of ``cases.jsonl``. A case with more than :data:`RECORD_MAX_IDS` candidates (the
    whole catalogue) records the candidate count instead of the ids, and the first
    ``RECORD_MAX_IDS`` of its ranking (every metric is at K <= 20; MRR beyond is 0)."""
    ranking = outcome.ranking if outcome else [(c, 0.0) for c in case.candidates]
    big = len(case.candidates) > RECORD_MAX_IDS
    if big:
        ranking = ranking[:RECORD_MAX_IDS]
    return {
        "i": i,
        "user": case.user_id,
        "candidates": {"n": len(case.candidates)} if big else list(case.candidates),
        "target": case.target,
        "relevant": list(relevant),
        "retrieved": retrieved,
        "ranking": [c for c, _ in ranking],
        "scores": [round(s, 6) for _, s in ranking],
        "valid": outcome.valid if outcome else None,
        "responses": outcome.responses if outcome else [],
        "prompt_tokens": outcome.prompt_tokens if outcome else 0,
        "completion_tokens": outcome.completion_tokens if outcome else 0,
        "latency_s": round(outcome.model_latency_s, 4) if outcome else 0.0,
        "wall_s": round(wall_s, 4),
        "extra": outcome.extra if outcome else {},
        **(extra or {}),
    }


async def _rank(ranker: Any, case: Any) -> RankOutcome:
    if hasattr(ranker, "arank"):
        return await ranker.arank(case)
    return RankOutcome(ranking=ranker.rank(case))


async def arun_next_item(config: RunConfig, *, model: Any = None, suite: Suite | None = None,
                         progress: bool = True) -> Path:
    """Async :func:`run_next_item`; ``model`` overrides the configured one (tests: FakeModel).

    Nothing is created until the configuration is checked, the cases are built and the ranker is
    ready: a run that cannot start leaves no folder behind.
    """
    if config.ranker_name not in RANKERS:
        raise ValueError(f"--ranker {config.ranker}: unknown; known: {', '.join(RANKERS)}")
    if config.source is not None and config.ranker != "pipeline":
        raise ValueError(f"--source applies to --ranker pipeline (got --ranker {config.ranker})")
    if suite is None:
        check_config(config)
    run_dir = _run_dir(config)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("run") != config.identity():
            raise ValueError(f"{run_dir} holds a different configuration; choose another --out")
    t_setup = time.perf_counter()
    suite = suite or build_suite(config)
    setup = await suite.make_ranker(config, model)
    ranker = setup.ranker
    run_dir.mkdir(parents=True, exist_ok=True)
    done = {r["i"] for r in read_cases(run_dir)}
    meta = {
        "run": config.identity(),
        "protocol": config.protocol, "dataset": config.dataset,
        "candidates_source": suite.candidates_source, "n_cases": len(suite.cases),
        "users": [c.user_id for c, _, _ in suite.cases][:10] + (["..."] if len(suite.cases) > 10 else []),
        "seed": config.seed, "position": config.position, "ranker": config.ranker,
        **setup.info, "fitted_on": suite.notes, "git_commit": git_commit(),
        "setup_s": round(time.perf_counter() - t_setup, 2),
        "resumed_from": len(done) if done else None,
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    cfg_path.write_text(json.dumps(meta, indent=2, default=str))
    todo = [(i, c) for i, c in enumerate(suite.cases) if i not in done]
    with open(run_dir / "cases.jsonl", "a", encoding="utf-8") as fh, tqdm(
        total=len(suite.cases), initial=len(done), disable=not progress, unit="case",
        desc=config.run_name(), dynamic_ncols=True,
    ) as bar:
        t_loop = time.perf_counter()
        for n, (i, (case, relevant, retrieved)) in enumerate(todo, start=1):
            t0 = time.perf_counter()
            outcome = await _rank(ranker, case) if retrieved else None
            rec = case_record(i, case, outcome, time.perf_counter() - t0, relevant, retrieved,
                              suite.case_extra[i] if suite.case_extra else None)
            if outcome is not None and outcome.prompt and not (run_dir / "prompt_sample.txt").exists():
                (run_dir / "prompt_sample.txt").write_text(
                    "\n\n".join(f"### {m['role']}\n{m['content']}" for m in outcome.prompt) + "\n")
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            rate = n / max(time.perf_counter() - t_loop, 1e-9) * 60
            bar.set_postfix_str(f"{rate:.1f} cases/min")
            bar.update(1)
    metrics = rescore(run_dir)
    cached = getattr(setup.model, "hits", None)
    meta["finished"] = datetime.now().isoformat(timespec="seconds")
    meta["model_calls_this_session"] = getattr(setup.model, "misses", None)
    meta["cache_hits_this_session"] = cached
    cfg_path.write_text(json.dumps(meta, indent=2, default=str))
    write_report(run_dir, meta, metrics)
    return run_dir


def run_next_item(config: RunConfig, **kwargs: Any) -> Path:
    """Run one configuration (see :class:`RunConfig`) and return its run folder.

    Resumes when ``config.out`` names a folder holding the same configuration.

    Raises:
        ValueError: unknown ranker/protocol/dataset, or ``out`` holds another configuration.
        ModelUnavailableError: the model server cannot be started or reached.
    """
    return asyncio.run(arun_next_item(config, **kwargs))


def rescore(run_dir: Path) -> dict[str, Any]:
    """Recompute ``metrics.json`` from ``cases.jsonl`` (no model); returns the metrics."""
    run_dir = Path(run_dir)
    metrics = compute_metrics(read_cases(run_dir))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@dataclass
class RankerSetup:
    ranker: Any
    model: Any = None
    info: dict[str, Any] = field(default_factory=dict)


async def make_ranker(suite: Suite, config: RunConfig, model: Any = None) -> RankerSetup:
    """Build ``config.ranker`` for ``suite``; LLM rankers get one shared, cached model.

    Raises:
        ValueError: unknown ranker.
    """
    from agent.llm.prompting import load_prompt
    from eval.baselines import RandomRanker, ScoreRanker
    from eval.llm_rankers import (
        GenerateRanker,
        HybridRanker,
        PointwiseRanker,
        SimilarUserDemos,
        VerbalizerRanker,
        choose_hybrid_weight,
    )

    name = config.ranker_name
    if name not in RANKERS:
        raise ValueError(f"unknown ranker {name!r}; known: {', '.join(RANKERS)}")
    if name == "random":
        return RankerSetup(RandomRanker(config.seed))
    if name == "pipeline":
        return await _pipeline(suite, config, model)
    if name in ("fused", "fused-sasrec"):
        fused, fusion_info = _fusion(suite, config)
        return RankerSetup(fused, info=fusion_info)
    if name in BASELINE_RANKERS:
        if name not in suite.scorers:
            raise ValueError(f"source {name!r} is not available for this dataset")
        return RankerSetup(ScoreRanker(suite.scorers[name], config.seed))
    model, info = await _cached_model(config, model)
    ref = config.prompt or PROMPT_FOR.get(name, DEFAULT_PROMPT)
    tpl = load_prompt(ref)
    info.update({"prompt": ref, "prompt_sha256": tpl.sha256})
    perms = 1 if name in ("llm", "llm-fewshot") else config.permutations
    if name == "llm-generate":
        return RankerSetup(GenerateRanker(model, tpl, suite.titles, seed=config.seed), model, info)
    examples = None
    if name == "llm-fewshot":
        ids, vecs = suite.embeddings
        examples = SimilarUserDemos(suite.demo_pool, ids, vecs, suite.titles, k=config.fewshot_k,
                                    seed=config.seed)
        info["fewshot"] = f"{config.fewshot_k} demo(s) from nearest of {len(suite.demo_pool)} " \
                          "training users (recent-title embedding), never the evaluated user"
    verb: VerbalizerRanker | PointwiseRanker
    if name in ("llm-pointwise", "hybrid-pointwise"):
        verb = PointwiseRanker(model, tpl, suite.titles, seed=config.seed, name=name)
        info["scorer"] = "pointwise yes/no, log P(yes) - log P(no), one call per candidate"
    else:
        verb = VerbalizerRanker(model, tpl, suite.titles, permutations=perms, seed=config.seed,
                                name=name, examples_fn=examples)
        info["permutations"] = perms
    if not name.startswith("hybrid"):
        return RankerSetup(verb, model, info)
    fused, fusion_info = _fusion(suite, config)
    w = config.hybrid_w
    if w is None:
        val = suite.validation[: config.hybrid_val_users]
        if not val:
            raise ValueError("hybrid needs validation users (use --hybrid-w to fix the weight)")
        llm_scores = []
        for c in tqdm(val, desc="hybrid weight (validation users)", unit="case"):
            llm_scores.append((await verb.llm_scores(c))[0])
        w, table = choose_hybrid_weight(val, [fused.scores(c) for c in val], llm_scores,
                                        seed=config.seed, feature=verb.feature)
        info["hybrid_weight_search"] = {"users": [c.user_id for c in val], "ndcg@10_by_w": table}
    info["hybrid_w"] = w
    info.update(fusion_info)
    return RankerSetup(HybridRanker(fused, verb, w, seed=config.seed, name=name), model, info)


def _fusion(suite: Suite, config: RunConfig) -> tuple[Any, dict[str, Any]]:
    """The fused ranker of ``fused`` / ``fused-sasrec`` / ``hybrid`` and its config.json info.

    ``fused`` without an ablation is the suite's own; with SASRec (``fused-sasrec``, or
    ``hybrid`` given ``config.sasrec``) or ``config.fusion_drop`` the weights are refit on the
    suite's validation users (:func:`eval.suites.fit_fusion`).
    """
    sasrec = config.ranker == "fused-sasrec" or (config.ranker_name.startswith("hybrid") and bool(config.sasrec))
    if not sasrec and config.fusion_drop is None:
        return suite.fused, {"fusion_sources": [s.name for s in suite.fused.scorers]}
    names = fusion_names(suite, sasrec=sasrec, drop=config.fusion_drop)
    fused, weights = fit_fusion(suite, names, config.seed)
    info: dict[str, Any] = {"fusion_sources": names, "fusion_refit": weights}
    if sasrec:
        info["sasrec"] = suite.notes.get("sasrec", {"model_dir": config.sasrec})
    return fused, info


async def _pipeline(suite: Suite, config: RunConfig, model: Any) -> RankerSetup:
    """The served pipeline over a store of the suite's training data (eval/pipeline.py): the
    suite's own runtime (generic protocols), else one over its training sequences."""
    import asyncio

    from agent.app.service import ShopLensService
    from eval.pipeline import PipelineRanker, pipeline_runtime

    rt = suite.runtime
    if rt is None:
        rt = await asyncio.to_thread(pipeline_runtime, _workspace(config), config.dataset, suite.train_by_user,
                                     suite.titles, embedder=config.extra.get("embedder"))
    info: dict[str, Any] = {}
    if config.untrained:
        rt.artifacts(config.dataset).fusion_weights = None  # the served defaults
        rt.artifacts(config.dataset).fusion_note = ""
    elif rt.artifacts(config.dataset).fusion_weights is None:
        svc = ShopLensService(rt, use_model=False)
        try:
            await asyncio.to_thread(svc.train, config.dataset, users=config.extra.get("train_users", 2000),
                                    seed=config.seed)
        except ValueError as e:  # too little data to fit: the served defaults, said in config.json
            info["fusion_untrained_because"] = str(e)
    info["fusion"] = rt.artifacts(config.dataset).fusion_note or "default source weights (untrained)"
    cached = None
    if not config.no_llm:
        cached, model_info = await _cached_model(config, model)
        info.update(model_info)
        if config.fit_llm_weight:
            info["llm_weight_fit"] = await _fit_llm_weight(rt, config, cached)
    ranker = PipelineRanker(rt, config.dataset, cached, llm_scorer=config.llm_scorer,  # type: ignore[arg-type]
                            llm_weight=config.llm_weight,
                            name="pipeline-no-llm" if config.no_llm else "pipeline", histories=suite.histories,
                            source=config.source, repurchase=config.repurchase and suite.runtime is not None,
                            full_k=config.n_candidates)
    info.update(ranker.describe())
    return RankerSetup(ranker, cached, info)


async def _fit_llm_weight(rt: Any, config: RunConfig, model: Any) -> dict[str, Any]:
    """Fit the pipeline store's model weight with the run's (cached) model, unless a fit of the
    same size and seed is already there; returns what config.json records about it."""
    from agent.app.service import ShopLensService
    from agent.tasks.llm_weight import load_llm_weight

    folder = rt.settings.index_dir(config.dataset)
    done = load_llm_weight(folder, config.dataset)
    if done is None or (done.n_windows, done.seed) != (config.fit_llm_weight, config.seed):

        async def provider() -> Any:
            return model

        bar = tqdm(desc="model weight: validation windows", unit="window")

        def tick(k: int, total: int) -> None:
            bar.total = total
            bar.update(k - bar.n)

        try:
            done, _ = await ShopLensService(rt, model_provider=provider).train_llm_weight(
                config.dataset, windows=config.fit_llm_weight or 0, seed=config.seed, progress=tick)
        finally:
            bar.close()
    arts = rt.artifacts(config.dataset)  # its weight: loaded with it from disk, or set by the fit
    return {"served_weight": arts.llm_weight, "best_weight": done.best_weight, "n_windows": done.n_windows,
            "n_sets": done.n_sets, "metrics": done.metrics}


async def _cached_model(config: RunConfig, model: Any) -> tuple[Any, dict[str, Any]]:
    from agent.app.runtime import Runtime
    from agent.settings import load_settings
    from eval.cache import CachedModel, ResponseCache

    ws = _workspace(config)
    if model is None:
        rt = Runtime(load_settings(workspace=config.workspace, data_dir=config.data_dir,
                                   llm_profile=config.model_profile))
        model = await rt.model()
        sha = rt.model_sha256 or f"remote:{model.model_id}"
    else:
        sha = getattr(model, "sha256", None) or f"unhashed:{model.model_id}"
    cached = CachedModel(model, ResponseCache(ws / "cache" / "llm_responses.sqlite3"), sha)
    return cached, {"model_id": model.model_id, "model_sha256": sha}


def fusion_ablation(config: RunConfig, *, progress: bool = False) -> dict[str, Path]:
    """``config`` once as is, then once per fused source with that source removed (weights
    refit on validation users each time); one suite is built and shared. Run folders go to
    ``<config.out or runs_dir/name>-no-<source>``. Returns {"all" | source: run folder}."""
    suite = build_suite(config)
    base = _run_dir(config)
    out = {"all": run_next_item(replace(config, out=base), suite=suite, progress=progress)}
    sasrec = config.ranker == "fused-sasrec" or bool(config.sasrec)
    for src in fusion_names(suite, sasrec=sasrec):
        cfg = replace(config, out=base.with_name(f"{base.name}-no-{src}"), fusion_drop=src)
        out[src] = run_next_item(cfg, suite=suite, progress=progress)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m eval.runner ablate [--users N] [--ranker fused-sasrec] [--out DIR]``: the
    per-source ablation of the fused ranker on Games-200 random (LLMRank protocol)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("command", choices=["ablate"])
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--ranker", default="fused-sasrec", choices=["fused", "fused-sasrec"])
    ap.add_argument("--sasrec", default=None, help="SASRec folder (default: the ranker's)")
    ap.add_argument("--seed", type=int, default=2023)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = RunConfig(users=args.users or None, ranker=args.ranker, seed=args.seed, out=args.out,
                    sasrec=args.sasrec)
    for src, run_dir in fusion_ablation(cfg).items():
        m = json.loads((run_dir / "metrics.json").read_text())
        print(f"{'all sources' if src == 'all' else 'without ' + src:24s} "
              f"NDCG@10 {m['ndcg@10']:6.2f}  HR@10 {m['hr@10']:6.2f}  {run_dir}")


if __name__ == "__main__":
    main()
