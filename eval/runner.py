"""The offline next-item harness: a configuration in, a reproducible run folder out.

``run_next_item(config)`` builds the cases of one protocol (:func:`build_suite`), builds the
ranker, ranks every case and writes
``runs/<timestamp>-<name>/``:

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
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.llm_rankers import RankOutcome
from eval.report import compute_metrics, write_report

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LLM_RANKERS = ("llm", "llm-perm", "llm-generate", "llm-fewshot", "hybrid")
BASELINE_RANKERS = ("random", "pop", "covisit", "bm25", "embedding", "fused")
RANKERS = BASELINE_RANKERS + LLM_RANKERS
PROMPT_FOR = {"llm-generate": "next_item_generate.v1"}
DEFAULT_PROMPT = "next_item_rank_titles.v1"


@dataclass
class RunConfig:
    """One evaluation run. Everything that changes a number is in here (and in config.json).

    Attributes:
        dataset: ``amazon-games``, ``amazon-industrial`` or ``online-retail``.
        protocol: ``llmrank``, ``full`` or ``leave-last-basket``.
        candidates: candidate source for ``llmrank`` (``random``, ``bm25``, ... from
            ``Games-200/``, or ``6k-random`` / ``6k-pop``).
        users: evaluate the first N users (None: all).
        ranker: one of :data:`RANKERS`.
        prompt: prompt reference; None: the ranker's default.
        permutations: verbalizer passes (``llm-perm`` / ``hybrid``; ``llm`` always uses 1).
        position: ``shuffle`` (published protocol), ``first`` or ``last`` (position-bias check).
        hybrid_val_users: validation users (Games-6k, not in Games-200) for the hybrid weight.
        hybrid_w: fix the hybrid weight instead of choosing it on validation users.
        fewshot_k: demonstrations per prompt for ``llm-fewshot``.
    """

    dataset: str = "amazon-games"
    protocol: str = "llmrank"
    candidates: str = "random"
    split: str = "test"
    users: int | None = 200
    ranker: str = "fused"
    prompt: str | None = None
    seed: int = 2023
    position: str = "shuffle"
    permutations: int = 2
    hybrid_val_users: int = 40
    hybrid_w: float | None = None
    fewshot_k: int = 1
    model_profile: str | None = None
    name: str | None = None
    out: Path | None = None
    runs_dir: Path = PROJECT_ROOT / "runs"
    data_dir: Path | None = None
    workspace: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def run_name(self) -> str:
        return self.name or f"{self.dataset}-{self.protocol}-{self.candidates}-{self.ranker}"

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the original."""
        d = asdict(self)
        for k in ("out", "runs_dir", "name", "data_dir", "workspace"):
            d.pop(k)
        return d


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_dir(config: RunConfig) -> Path:
    if config.out is not None:
        return Path(config.out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.runs_dir) / f"{stamp}-{config.run_name()}"


def read_cases(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``cases.jsonl`` sorted by case index; a torn last line is dropped."""
    path = Path(run_dir) / "cases.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # interrupted mid-write: that case runs again
    return sorted({r["i"]: r for r in out}.values(), key=lambda r: r["i"])


def case_record(i: int, case: Any, outcome: RankOutcome | None, wall_s: float,
                relevant: Sequence[str], retrieved: bool) -> dict[str, Any]:
    ranking = outcome.ranking if outcome else [(c, 0.0) for c in case.candidates]
    return {
        "i": i,
        "user": case.user_id,
        "candidates": list(case.candidates),
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
    }


async def _rank(ranker: Any, case: Any) -> RankOutcome:
    if hasattr(ranker, "arank"):
        return await ranker.arank(case)
    return RankOutcome(ranking=ranker.rank(case))


async def arun_next_item(config: RunConfig, *, model: Any = None, suite: Suite | None = None,
                         progress: bool = True) -> Path:
    """Async :func:`run_next_item`; ``model`` overrides the configured one (tests: FakeModel)."""
    run_dir = _run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("run") != config.identity():
            raise ValueError(f"{run_dir} holds a different configuration; choose another --out")
    t_setup = time.perf_counter()
    suite = suite or build_suite(config)
    setup = await suite.make_ranker(config, model)
    ranker = setup.ranker
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
            rec = case_record(i, case, outcome, time.perf_counter() - t0, relevant, retrieved)
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


# --- suites: the cases of one protocol, and the rankers fitted for it ------------------------
# (Kept here because the harness owns one module per role; split into eval/suites.py when the
# sentiment/intent tasks land.)

Case = tuple[Any, list[str], bool]  # (RankingCase, relevant ids, ground truth retrieved?)


@dataclass
class RankerSetup:
    ranker: Any
    model: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    """Cases plus everything needed to build any ranker for them."""

    cases: list[Case]
    candidates_source: str
    titles: dict[str, str]
    scorers: dict[str, Any]
    fused: Any
    notes: dict[str, Any] = field(default_factory=dict)
    validation: list[Any] = field(default_factory=list)  # RankingCases for the hybrid weight
    demo_pool: dict[str, list[str]] = field(default_factory=dict)
    embeddings: Any = None

    async def make_ranker(self, config: RunConfig, model: Any = None) -> RankerSetup:
        return await make_ranker(self, config, model)


def _data_dir(config: RunConfig) -> Path:
    if config.data_dir is not None:
        return Path(config.data_dir)
    from eval.run_llmrank_baselines import default_data_dir

    return default_data_dir()


def _workspace(config: RunConfig) -> Path:
    if config.workspace is not None:
        return Path(config.workspace)
    from eval.run_llmrank_baselines import default_workspace

    return default_workspace()


def build_suite(config: RunConfig) -> Suite:
    """Cases and fitted non-LLM sources for ``config.protocol`` on ``config.dataset``.

    Raises:
        ValueError: an unknown protocol/dataset pair.
    """
    key = (config.protocol, config.dataset)
    if key == ("llmrank", "amazon-games"):
        return _games_llmrank(config)
    if key == ("full", "amazon-games"):
        return _games_full(config)
    if key == ("full", "amazon-industrial"):
        return _industrial_full(config)
    if key == ("leave-last-basket", "online-retail"):
        return _retail_basket(config)
    raise ValueError(
        f"no protocol {config.protocol!r} for dataset {config.dataset!r}; known: llmrank/full on "
        "amazon-games, full on amazon-industrial, leave-last-basket on online-retail"
    )


def _games_llmrank(config: RunConfig) -> Suite:
    from eval.protocols import llmrank_cases, load_llmrank_candidates

    g = _games_context(config)
    root = g["root"]
    if config.candidates.startswith("6k-"):
        path = root / f"Games-6k.{config.candidates[3:]}.gz"
    else:
        path = root / "Games-200" / f"Games.{config.candidates}"
    cand = load_llmrank_candidates(path)
    users = list(cand)[: config.users] if config.users else list(cand)
    cases = llmrank_cases(g["interactions"], cand, users, seed=config.seed,
                          position=config.position, source=config.candidates)  # type: ignore[arg-type]
    leak = sorted(set(users) & set(g["fit_users"]))
    notes = {**g["notes"], "candidate_file": str(path.relative_to(root.parent))}
    if leak:
        notes["warning"] = (f"{len(leak)} evaluated users are fusion/hybrid validation users: "
                            "their targets fitted the weights (not the counts)")
    return Suite([(c, [c.target], True) for c in cases], path.name, g["titles"], g["scorers"],
                 g["fused"], notes, g["validation"], g["pool"], g["embeddings"])


def _games_context(config: RunConfig) -> dict[str, Any]:
    """Games data, leak-free training counts, the fused ranker fitted on validation users."""
    from eval.protocols import (
        llmrank_cases,
        load_llmrank_candidates,
        load_llmrank_interactions,
        load_llmrank_titles,
    )
    from eval.run_llmrank_baselines import (
        build_scorers,
        fit_fused,
        title_embeddings,
        training_sequences,
    )

    root = _data_dir(config) / "amazon-games"
    interactions = load_llmrank_interactions(root)
    titles = load_llmrank_titles(root)
    test_users = list(load_llmrank_candidates(root / "Games-200" / "Games.random"))
    c6r = load_llmrank_candidates(root / "Games-6k.random.gz")
    c6p = load_llmrank_candidates(root / "Games-6k.pop.gz")
    held_out = set(test_users) | set(c6r) | set(c6p)
    train = training_sequences(interactions, held_out)
    embeddings = title_embeddings(titles, _workspace(config) / "cache")
    scorers = build_scorers(train, titles, embeddings)
    val_users = [u for u in c6r if u not in set(test_users)]
    validation = llmrank_cases(interactions, c6r, val_users, seed=config.seed, source="random")
    fused, info = fit_fused(scorers, validation)
    pool = {u: [*s.history, s.target] for u, s in interactions.items() if u not in held_out}
    notes = {
        "counts": "pop/co-visitation on every history + full sequences of the "
                  f"{len(pool)} users outside Games-6k/Games-200 (no evaluated target)",
        "fusion_weights": f"fitted on {len(validation)} Games-6k.random users not in Games-200",
        "fusion": info,
    }
    return {"root": root, "interactions": interactions, "titles": titles, "scorers": scorers,
            "fused": fused, "validation": validation, "pool": pool, "embeddings": embeddings,
            "notes": notes, "fit_users": val_users, "held_out": held_out}


def _full_cases(cases: Sequence[Any], fused: Any, catalogue: Sequence[str], seed: int,
                position: str, k: int = 20) -> tuple[list[Case], float]:
    """Retrieval over the whole catalogue with the fused sources; the top ``k`` (history items
    excluded) become the candidates, in a seeded shuffle. Returns cases and recall@k."""
    from eval.protocols import RankingCase, case_rng

    out: list[Case] = []
    hits = 0
    for c in cases:
        seen = set(c.history)
        pool = tuple(i for i in catalogue if i not in seen or i == c.target)
        full = RankingCase(c.user_id, c.history, pool, c.target, seed=seed, source="full")
        scores = fused.scores(full)
        top = [i for i in sorted(scores, key=lambda i: -scores[i]) if i not in seen][:k]
        retrieved = c.target in top
        hits += retrieved
        if position == "shuffle":
            case_rng(seed, c.user_id).shuffle(top)
        target = c.target if retrieved else top[0]
        rc = RankingCase(c.user_id, c.history, tuple(top), target, seed=seed, source="full")
        out.append((rc, [c.target], retrieved))
    return out, 100.0 * hits / max(len(cases), 1)


def _games_full(config: RunConfig) -> Suite:
    g = _games_context(config)
    base = _games_llmrank(config)
    cases, recall = _full_cases([c for c, _, _ in base.cases], g["fused"], list(g["titles"]),
                                config.seed, config.position)
    notes = {**g["notes"], "retrieval": f"fused sources over all {len(g['titles'])} items, "
             f"top 20; recall@20 = {recall:.2f}"}
    return Suite(cases, "full-catalogue", g["titles"], g["scorers"], g["fused"], notes,
                 g["validation"], g["pool"], g["embeddings"])


def _industrial_full(config: RunConfig) -> Suite:
    import gzip

    from agent.ingest.amazon_industrial import read_industrial_cases
    from eval.protocols import RankingCase, case_rng
    from eval.run_llmrank_baselines import build_scorers, fit_fused, title_embeddings

    root = _data_dir(config) / "amazon-industrial"
    with gzip.open(root / "Industrial_and_Scientific.item.json.gz", "rt", encoding="utf-8") as fh:
        titles = {k: " ".join(str((v or {}).get("title") or "").split()) for k, v in json.load(fh).items()}
    valid = read_industrial_cases(root, "valid")
    first: dict[str, tuple[str, list[str], str]] = {}
    for u, h, t in read_industrial_cases(root, config.split):
        first.setdefault(u, (u, h, t))
    # Counts: valid windows (earlier in time) + the history of each user's first evaluated row.
    train = [[*h, t] for _, h, t in valid] + [h for _, h, _ in first.values()]
    embeddings = title_embeddings(titles, _workspace(config) / "cache")
    scorers = build_scorers(train, titles, embeddings)
    items = list(titles)
    val_cases = []
    for u, h, t in valid[:2000]:
        if not h or t not in titles:
            continue
        rng = case_rng(config.seed, f"val:{u}:{t}")
        negs = [x for x in rng.sample(items, 25) if x != t and x not in h][:19]
        order = [*negs, t]
        rng.shuffle(order)
        val_cases.append(RankingCase(u, tuple(h), tuple(order), t, seed=config.seed))
    fused, info = fit_fused(scorers, val_cases)
    users = list(first)[: config.users] if config.users else list(first)
    base = [RankingCase(u, tuple(first[u][1]), (first[u][2],), first[u][2], seed=config.seed)
            for u in users]
    cases, recall = _full_cases(base, fused, items, config.seed, config.position)
    notes = {"counts": "valid windows + first test-row histories (no evaluated target)",
             "fusion_weights": f"fitted on {len(val_cases)} valid rows with 19 random negatives "
                               "(their targets are in the counts: optimistic for co-visitation)",
             "fusion": info, "cases": f"first {config.split} row of each user",
             "retrieval": f"fused sources over all {len(items)} items, top 20; recall@20 = {recall:.2f}"}
    return Suite(cases, "full-catalogue", titles, scorers, fused, notes, [], {}, embeddings)


def _retail_basket(config: RunConfig) -> Suite:
    """Online Retail: each customer's last invoice held out, any of its items a hit.

    The saved artifacts (``shoplens ingest``) are built on ALL events, held-out baskets
    included, so they are not used: co-visitation/popularity are counted here on the events
    that remain after removing every evaluated customer's last invoice.
    """
    from agent.runtime import Runtime
    from agent.settings import load_settings
    from eval.protocols import RankingCase, case_rng
    from eval.run_llmrank_baselines import build_scorers, fit_fused

    rt = Runtime(load_settings(workspace=config.workspace, data_dir=config.data_dir))
    ds = "online-retail"
    titles = {i: it.title for i, it in rt.store.items(ds).items()}
    by_user: dict[str, list[Any]] = {}
    for e in rt.store.iter_events(ds):
        by_user.setdefault(e.user_id, []).append(e)
    seqs: dict[str, tuple[list[str], list[str]]] = {}
    for u, evs in by_user.items():
        baskets = list(dict.fromkeys(e.basket_id for e in evs))
        if len(baskets) < 2:
            continue
        last = baskets[-1]
        hist = [e.item_id for e in evs if e.basket_id != last]
        seqs[u] = (hist, sorted({e.item_id for e in evs if e.basket_id == last}))
    users = sorted(seqs)
    train = [h for h, _ in seqs.values()] + [
        [e.item_id for e in evs] for u, evs in by_user.items() if u not in seqs]
    scorers = build_scorers(train, titles, None)  # fusion learns in_history's sign (repurchase)
    eval_users = users[: config.users] if config.users else users
    val_users = users[len(eval_users):][:1000] or users[:200]
    items = list(titles)

    def base(u: str) -> Any:
        h, rel = seqs[u]
        return RankingCase(u, tuple(h[-200:]), (rel[0],), rel[0], seed=config.seed)

    val_cases = []
    for u in val_users:
        c = base(u)
        rng = case_rng(config.seed, f"val:{u}")
        negs = [x for x in rng.sample(items, 30) if x not in seqs[u][1]][:19]
        order = [*negs, c.target]
        rng.shuffle(order)
        val_cases.append(RankingCase(u, c.history, tuple(order), c.target, seed=config.seed))
    fused, info = fit_fused(scorers, val_cases)
    raw, _ = _full_cases([base(u) for u in eval_users], fused, items, config.seed, config.position)
    cases: list[Case] = []
    hits = 0
    for (rc, _, _), u in zip(raw, eval_users, strict=True):
        rel = [i for i in seqs[u][1] if i in rc.candidates]
        hits += bool(rel)
        rc2 = RankingCase(u, rc.history, rc.candidates, rel[0] if rel else rc.candidates[0],
                          seed=config.seed, source="basket")
        cases.append((rc2, seqs[u][1], bool(rel)))
    notes = {"counts": "all events minus every evaluated customer's last invoice (saved artifacts "
                       "include the held-out baskets, so they are not used)",
             "fusion_weights": f"fitted on {len(val_cases)} other customers' last baskets vs 19 "
                               "random items (their baskets are in the counts)",
             "fusion": info, "retrieval": f"fused sources over {len(items)} items, top 20 "
             f"(history items excluded); recall@20 = {100.0 * hits / max(len(cases), 1):.2f}"}
    return Suite(cases, "full-catalogue", titles, scorers, fused, notes)


async def make_ranker(suite: Suite, config: RunConfig, model: Any = None) -> RankerSetup:
    """Build ``config.ranker`` for ``suite``; LLM rankers get one shared, cached model.

    Raises:
        ValueError: unknown ranker.
    """
    from agent.prompting import load_prompt
    from eval.baselines import RandomRanker, ScoreRanker
    from eval.llm_rankers import (
        GenerateRanker,
        HybridRanker,
        SimilarUserDemos,
        VerbalizerRanker,
        choose_hybrid_weight,
    )

    name = config.ranker
    if name not in RANKERS:
        raise ValueError(f"unknown ranker {name!r}; known: {', '.join(RANKERS)}")
    if name == "random":
        return RankerSetup(RandomRanker(config.seed))
    if name == "fused":
        return RankerSetup(suite.fused, info={"fusion_sources": [s.name for s in suite.fused.scorers]})
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
    verb = VerbalizerRanker(model, tpl, suite.titles, permutations=perms, seed=config.seed,
                            name=name, examples_fn=examples)
    info["permutations"] = perms
    if name != "hybrid":
        return RankerSetup(verb, model, info)
    w = config.hybrid_w
    if w is None:
        val = suite.validation[: config.hybrid_val_users]
        if not val:
            raise ValueError("hybrid needs validation users (use --hybrid-w to fix the weight)")
        llm_scores = []
        for c in tqdm(val, desc="hybrid weight (validation users)", unit="case"):
            llm_scores.append((await verb.llm_scores(c))[0])
        w, table = choose_hybrid_weight(val, [suite.fused.scores(c) for c in val], llm_scores,
                                        seed=config.seed)
        info["hybrid_weight_search"] = {"users": [c.user_id for c in val], "ndcg@10_by_w": table}
    info["hybrid_w"] = w
    return RankerSetup(HybridRanker(suite.fused, verb, w, seed=config.seed), model, info)


async def _cached_model(config: RunConfig, model: Any) -> tuple[Any, dict[str, Any]]:
    from agent.runtime import Runtime
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
