"""The cases of one protocol, and the non-LLM sources fitted for them (used by eval/runner.py).

``build_suite(config)`` returns a :class:`Suite`: the cases, item titles, the fitted evidence
sources, the fused ranker and the validation cases (never evaluated users) that fitted it.

Two kinds of protocol (`eval.run_checks` says which a configuration is, and refuses one that
cannot run, before anything is built):

* built-in, on the shared data files, kept as published in docs/results.md: ``llmrank`` and
  ``full`` on amazon-games, ``full`` on amazon-industrial, ``leave-last-basket`` on online-retail
  (with the default candidates: the fused sources retrieve 20 from the whole catalogue);
* generic, on any dataset in the store (`eval.store_suite`): ``leave-one-out``,
  ``leave-last-basket``, ``temporal``, with ``random``, ``retrieved`` or ``full`` candidates.

With ``config.sasrec`` (or ranker ``fused-sasrec``), a trained SASRec folder
(``python -m eval.train_sasrec``) is loaded as one more source, ``sasrec``; :func:`fit_fusion`
refits the fusion weights on the validation users exactly as ``eval/train_sasrec.py`` does
(``feature_matrix`` + ``fit_fusion_weights`` on all of them, split-half check by its
``fused_metrics``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from eval.runner import RankerSetup, RunConfig

Case = tuple[Any, list[str], bool]  # (RankingCase, relevant ids, ground truth retrieved?)


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
    # user id -> training item ids, oldest first, with no evaluated target (the served
    # pipeline's store for ``--ranker pipeline``); empty where the protocol has none yet
    train_by_user: dict[str, list[str]] = field(default_factory=dict)
    # generic protocols (eval.store_suite): the served pipeline's runtime over the training
    # events, each evaluated user's history as real events, and per-case fields for cases.jsonl
    # (candidate_hit: the served generator retrieved a held-out item, ...), aligned with `cases`
    runtime: Any = None
    histories: dict[str, Any] = field(default_factory=dict)
    case_extra: list[dict[str, Any]] = field(default_factory=list)
    _columns: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)

    async def make_ranker(self, config: RunConfig, model: Any = None) -> RankerSetup:
        from eval.runner import make_ranker

        return await make_ranker(self, config, model)

    def validation_features(self, names: Sequence[str]) -> list[np.ndarray]:
        """Per validation case, ``feature_matrix(case, [scorers[n] for n in names])``; each
        source's z-scored column is computed once per suite (ablations reuse it)."""
        from eval.baselines import feature_matrix

        for n in names:
            if n not in self._columns:
                self._columns[n] = [feature_matrix(c, [self.scorers[n]])[:, 0]
                                    for c in self.validation]
        return [np.stack([self._columns[n][i] for n in names], axis=1)
                for i in range(len(self.validation))]


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


def sasrec_dir(config: RunConfig) -> Path | None:
    """The SASRec folder a run uses: ``config.sasrec``, else ``<workspace>/models/sasrec-games``
    for ranker ``fused-sasrec``, else None (no SASRec source)."""
    if config.sasrec:
        return Path(config.sasrec)
    if config.ranker == "fused-sasrec":
        return _workspace(config) / "models" / "sasrec-games"
    return None


def load_sasrec_source(folder: Path) -> tuple[Any, dict[str, Any]]:
    """A trained SASRec folder as a ``sasrec`` source, and what identifies it for config.json:
    the folder, sha256 of its config.json and model.pt (first 16 hex), training facts.

    Raises:
        FileNotFoundError: no trained model there (``python -m eval.train_sasrec``).
    """
    from eval.baselines import SequenceModelScorer
    from retrieval.sasrec import SASRecModel

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no SASRec model in {folder}: train one with "
                                f"`python -m eval.train_sasrec --out {folder}`")
    model = SASRecModel.load(folder)

    def sha(name: str) -> str:
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()[:16]

    info = model.info
    manifest = {
        "model_dir": str(folder), "config_sha256": sha("config.json"),
        "model_pt_sha256": sha("model.pt"), "config": json.loads(
            (folder / "config.json").read_text(encoding="utf-8"))["config"],
        "training": {k: info.get(k) for k in ("n_sequences", "best_epoch", "epochs_run", "loss",
                                               "seconds", "seed")},
    }
    return SequenceModelScorer(model), manifest


def fusion_names(suite: Suite, *, sasrec: bool, drop: str | None = None) -> list[str]:
    """The fused sources of ``suite`` (``FUSED_SOURCES`` order, then ``sasrec``), minus ``drop``.

    Raises:
        ValueError: SASRec requested but not loaded, or ``drop`` is not one of the sources.
    """
    from eval.run_llmrank_baselines import FUSED_SOURCES

    names = [n for n in FUSED_SOURCES if n in suite.scorers]
    if sasrec:
        if "sasrec" not in suite.scorers:
            raise ValueError("no SASRec source: give RunConfig.sasrec (SHOPLENS_SASREC) a folder "
                             "from `python -m eval.train_sasrec`")
        names.append("sasrec")
    if drop is not None:
        if drop not in names:
            raise ValueError(f"cannot drop {drop!r}: the sources are {', '.join(names)}")
        names.remove(drop)
    return names


def fit_fusion(suite: Suite, names: Sequence[str], seed: int) -> tuple[Any, dict[str, Any]]:
    """Fusion of ``names`` with weights refit on the suite's validation cases, as
    ``eval/train_sasrec.py`` does: ``fit_fusion_weights`` on all of them, plus its split-half
    check (fit on the first half, ``fused_metrics`` on the second).

    Raises:
        ValueError: the suite has no validation cases.
    """
    from eval.baselines import FusedRanker, fit_fusion_weights
    from eval.train_sasrec import fused_metrics

    val = suite.validation
    if not val:
        raise ValueError("refitting the fusion needs validation cases")
    feats = suite.validation_features(names)
    ys = [c.target_index for c in val]
    half = len(val) // 2
    weights = fit_fusion_weights(feats, ys)
    info: dict[str, Any] = {}
    if half:
        w_half = fit_fusion_weights(feats[:half], ys[:half])
        info["split_half_ndcg@10"] = fused_metrics(val[half:], feats[half:], w_half,
                                                   seed)["ndcg@10"]
    info.update({f"w_{n}": float(w) for n, w in zip(names, weights, strict=True)})
    info["n_validation"] = len(val)
    return FusedRanker([suite.scorers[n] for n in names], weights.tolist(), seed=seed), info


def build_suite(config: RunConfig) -> Suite:
    """Cases and fitted non-LLM sources for ``config.protocol`` on ``config.dataset``.

    Raises:
        ValueError: as :func:`check_config`, or the dataset has too few usable users.
    """
    key = (config.protocol, config.dataset)
    if sasrec_dir(config) is not None and config.dataset != "amazon-games":
        raise ValueError("the SASRec source is trained on LLMRank's amazon-games item ids only")
    from eval.run_checks import check_config, is_builtin

    if not is_builtin(config):
        from eval.store_suite import build_store_suite

        check_config(config)
        return build_store_suite(config)
    if key == ("llmrank", "amazon-games"):
        return _games_llmrank(config)
    if key == ("full", "amazon-games"):
        return _games_full(config)
    if key == ("full", "amazon-industrial"):
        return _industrial_full(config)
    return _retail_basket(config)


def _games_llmrank(config: RunConfig, g: dict[str, Any] | None = None) -> Suite:
    from eval.protocols import llmrank_cases, load_llmrank_candidates

    g = g or _games_context(config)
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
                 g["fused"], notes, g["validation"], g["pool"], g["embeddings"],
                 train_by_user=g["train_by_user"])


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
    folder = sasrec_dir(config)
    if folder is not None:
        scorers = dict(scorers)
        scorers["sasrec"], notes["sasrec"] = load_sasrec_source(folder)
    train_by_user = {u: [*s.history, s.target] if u not in held_out else list(s.history)
                     for u, s in interactions.items()}  # the same sequences as `train`, keyed
    return {"root": root, "interactions": interactions, "titles": titles, "scorers": scorers,
            "train_by_user": train_by_user,
            "fused": fused, "validation": validation, "pool": pool, "embeddings": embeddings,
            "notes": notes, "fit_users": val_users, "held_out": held_out}


def _full_cases(cases: Sequence[Any], fused: Any, catalogue: Sequence[str], seed: int,
                position: str, k: int = 20, repurchase: bool = False) -> tuple[list[Case], float]:
    """Retrieval over the whole catalogue with the fused sources; the top ``k`` (history items
    excluded unless ``repurchase``) become the candidates, in a seeded shuffle. Returns cases
    and recall@k."""
    from eval.protocols import RankingCase, case_rng

    out: list[Case] = []
    hits = 0
    for c in cases:
        seen = set() if repurchase else set(c.history)
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
    """LlamaRec's full-catalogue protocol on the Games-200 users: the fused sources (plus the
    trained SASRec when the run has one, weights refit on the validation users) retrieve the top
    20 of all items; the ranker orders them."""
    g = _games_context(config)
    base = _games_llmrank(config, g)
    fused, how = g["fused"], "fused sources"
    if "sasrec" in g["scorers"]:
        fused, _ = fit_fusion(base, fusion_names(base, sasrec=True), config.seed)
        how = "fused sources + SASRec (weights refit on the validation users)"
    cases, recall = _full_cases([c for c, _, _ in base.cases], fused, list(g["titles"]),
                                config.seed, config.position, repurchase=config.repurchase)
    notes = {**g["notes"], "retrieval": f"{how} over all {len(g['titles'])} items, "
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
    cases, recall = _full_cases(base, fused, items, config.seed, config.position,
                                repurchase=config.repurchase)
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
    from agent.app.runtime import Runtime
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
    raw, _ = _full_cases([base(u) for u in eval_users], fused, items, config.seed, config.position,
                         repurchase=config.repurchase)
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
             f"({'repurchases allowed' if config.repurchase else 'history items excluded'}); "
             f"recall@20 = {100.0 * hits / max(len(cases), 1):.2f}"}
    return Suite(cases, "full-catalogue", titles, scorers, fused, notes)


