"""Run the non-LLM baselines on LLMRank's Amazon Games protocol and print them beside the paper.

    python -m eval.run_llmrank_baselines [--data-dir DIR] [--out /tmp/eval_baselines.json]
                                         [--no-embedding] [--seed 2023]

What is fitted on what (no evaluated user's target is ever seen):

* Test users: the paper's 200 (``Games-200``). Validation users: the other 5,800 users of
  ``Games-6k.random`` (the 200 are a subset of the 6k). Fusion weights are fitted on the
  validation users only; the 200 are scored once.
* Popularity and co-visitation are counted on every user's history (histories precede
  targets) plus the full sequence (history + target) of the 44,546 users who are neither test
  nor validation users. No test or validation target is counted.

The fusion weights are fitted for random negatives. On the hard-negative sources (bm25, pop,
bpr, gru4rec, sasrec candidate lines) popularity and co-visitation point the wrong way, so the
same weights fall to or below the random ranker there; those rows are for reference, not tuned.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from eval.baselines import (
    BM25Scorer,
    CoVisitationScorer,
    EmbeddingScorer,
    FusedRanker,
    InHistoryScorer,
    PopularityScorer,
    RandomRanker,
    Ranker,
    Scorer,
    ScoreRanker,
    feature_matrix,
    fit_fusion_weights,
)
from eval.metrics import evaluate_rankings
from eval.protocols import (
    DEFAULT_SEED,
    RankingCase,
    UserSequence,
    llmrank_cases,
    load_llmrank_candidates,
    load_llmrank_interactions,
    load_llmrank_titles,
)
from retrieval.covisit import CoVisitation
from retrieval.popularity import Popularity

# Published NDCG@10 x100 on Games, 20 random candidates (Hou et al., ECIR 2024, Table 2;
# copied in ../shared/data/README.md).
PUBLISHED_NDCG10_RANDOM: dict[str, float] = {
    "Pop (trained)": 52.96,
    "BPRMF (trained)": 66.27,
    "SASRec (trained)": 75.92,
    "BM25 (zero-shot)": 34.61,
    "UniSRec (zero-shot)": 40.71,
    "ChatGPT sequential": 50.57,
    "ChatGPT recency-focused": 53.50,
    "ChatGPT in-context": 53.10,
    "GPT-4": 62.88,
    "Llama-2-70B-Chat": 37.83,
    "Vicuna-13B": 24.30,
}
OUR_TO_PUBLISHED = {"pop": "Pop (trained)", "bm25": "BM25 (zero-shot)"}
GAMES200_SOURCES = ("random", "bm25", "bert", "pop", "bpr", "gru4rec", "sasrec")
KS = (1, 5, 10, 20)


def default_data_dir() -> Path:
    """``agent.settings.Settings().data_dir`` when it imports, else ``../shared/data``."""
    try:
        from agent.settings import Settings

        return Path(Settings().data_dir)
    except Exception:  # noqa: BLE001 - any settings failure falls back to the documented path
        return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def default_workspace() -> Path:
    """``agent.settings.Settings().workspace`` when it imports, else ``<project>/var``."""
    try:
        from agent.settings import Settings

        return Path(Settings().workspace)
    except Exception:  # noqa: BLE001 - any settings failure falls back to the documented path
        return Path(__file__).resolve().parents[1] / "var"


def training_sequences(
    interactions: Mapping[str, UserSequence], held_out: set[str]
) -> list[list[str]]:
    """Every user's history, plus the target of users not in ``held_out`` (see module doc)."""
    return [
        [*seq.history, seq.target] if uid not in held_out else list(seq.history)
        for uid, seq in interactions.items()
    ]


def title_embeddings(
    titles: Mapping[str, str], cache_dir: Path, embedder_name: str = "all-MiniLM-L6-v2"
) -> tuple[list[str], np.ndarray]:
    """Unit title vectors ``(n_items, dim)`` float32, cached by embedder + catalogue hash."""
    ids = sorted(titles, key=int) if all(k.isdigit() for k in titles) else sorted(titles)
    digest = hashlib.sha256(
        "\x1e".join(f"{i}\x1f{titles[i]}" for i in ids).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"titles_{embedder_name}_{digest}.npy"
    if path.exists():
        return ids, np.load(path)
    from retrieval.embedder import make_embedder  # heavy: torch + sentence-transformers

    vectors = make_embedder(embedder_name).embed([titles[i] for i in ids], batch_size=128)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return ids, vectors


def build_scorers(
    train: Sequence[Sequence[str]],
    titles: Mapping[str, str],
    embeddings: tuple[list[str], np.ndarray] | None,
) -> dict[str, Scorer]:
    """The evidence sources; the fused ranker uses all of them."""
    pop = Popularity().fit(train)
    cv = CoVisitation().fit(train)
    scorers: dict[str, Scorer] = {
        "pop": PopularityScorer(pop),
        "covisit": CoVisitationScorer(cv),
        # Separate views of the same counts: fusion weighs transitions and co-occurrence apart.
        "forward": CoVisitationScorer(
            cv.with_config(cooc_weight=0.0, normalisation="none"), name="forward"
        ),
        "cooc": CoVisitationScorer(
            cv.with_config(forward_weight=0.0, normalisation="none"), name="cooc"
        ),
        "cooc_cosine": CoVisitationScorer(
            cv.with_config(forward_weight=0.0, normalisation="cosine"), name="cooc_cosine"
        ),
        "cooc_all": CoVisitationScorer(
            cv.with_config(forward_weight=0.0, normalisation="none", recency=1.0), name="cooc_all"
        ),
        "in_history": InHistoryScorer(),
        "bm25": BM25Scorer(titles),
    }
    if embeddings is not None:
        scorers["embedding"] = EmbeddingScorer(*embeddings)
    return scorers


FUSED_SOURCES = ("pop", "forward", "cooc", "cooc_cosine", "cooc_all", "in_history", "bm25",
                 "embedding")


def fit_fused(
    scorers: Mapping[str, Scorer], validation: Sequence[RankingCase]
) -> tuple[FusedRanker, dict[str, float]]:
    """Fit fusion weights on validation cases; also report a split-half check (fit on the
    first half, score the second) so overfitting of the weights shows."""
    names = [n for n in FUSED_SOURCES if n in scorers]
    sources = [scorers[n] for n in names]
    feats = [feature_matrix(c, sources) for c in validation]
    ys = [c.target_index for c in validation]
    half = len(validation) // 2
    w_half = fit_fusion_weights(feats[:half], ys[:half])
    half_ranker = FusedRanker(sources, w_half.tolist())
    check = score_ranker(half_ranker, validation[half:])
    weights = fit_fusion_weights(feats, ys)
    return FusedRanker(sources, weights.tolist()), {
        "split_half_ndcg@10": check["ndcg@10"],
        **{f"w_{n}": float(w) for n, w in zip(names, weights, strict=True)},
    }


def score_ranker(ranker: Ranker, cases: Sequence[RankingCase]) -> dict[str, float]:
    """NDCG@K and HR@K x100 over all cases."""
    rankings = [[c for c, _ in ranker.rank(case)] for case in cases]
    return evaluate_rankings(rankings, [{case.target} for case in cases], ks=KS)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/eval_baselines.json"))
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--no-embedding", action="store_true", help="skip the MiniLM title source")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="title-embedding cache; default <workspace>/cache")
    args = ap.parse_args(argv)
    t0 = time.time()
    root = (args.data_dir or default_data_dir()) / "amazon-games"
    interactions = load_llmrank_interactions(root)
    titles = load_llmrank_titles(root)
    cand200 = {s: load_llmrank_candidates(root / "Games-200" / f"Games.{s}")
               for s in GAMES200_SOURCES}
    cand6k = {s: load_llmrank_candidates(root / f"Games-6k.{s}.gz") for s in ("random", "pop")}
    test_users = list(cand200["random"])
    validation_users = [u for u in cand6k["random"] if u not in set(test_users)]
    held_out = set(test_users) | set(cand6k["random"]) | set(cand6k["pop"])
    train = training_sequences(interactions, held_out)

    embeddings = None
    if not args.no_embedding:
        cache = args.cache_dir or default_workspace() / "cache"
        embeddings = title_embeddings(titles, cache)
    scorers = build_scorers(train, titles, embeddings)

    validation = llmrank_cases(interactions, cand6k["random"], validation_users,
                               seed=args.seed, source="random")
    fused, fusion_info = fit_fused(scorers, validation)
    rankers: list[Ranker] = [RandomRanker(args.seed)]
    rankers += [ScoreRanker(scorers[n], args.seed) for n in ("pop", "covisit", "bm25")]
    if "embedding" in scorers:
        rankers.append(ScoreRanker(scorers["embedding"], args.seed))
    rankers.append(fused)

    suites: dict[str, list[RankingCase]] = {
        f"Games-200.{s}": llmrank_cases(interactions, cand200[s], seed=args.seed, source=s)
        for s in GAMES200_SOURCES
    }
    suites["Games-6k.random (validation users)"] = validation
    suites["Games-6k.pop (validation users)"] = llmrank_cases(
        interactions, cand6k["pop"], validation_users, seed=args.seed, source="pop")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for suite, cases in suites.items():
        results[suite] = {r.name: score_ranker(r, cases) for r in rankers}
        print_table(suite, len(cases), results[suite])

    payload: dict[str, object] = {
        "protocol": "LLMRank (Hou et al., ECIR 2024): 19 negatives from the candidate line + "
                    "ground truth, shuffled per case with seed",
        "seed": args.seed,
        "n_train_sequences": len(train),
        "fit_on": "all histories + full sequences of users outside Games-6k/Games-200",
        "fusion": fusion_info,
        "published_ndcg@10_random": PUBLISHED_NDCG10_RANDOM,
        "results": results,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nfusion (fitted on {len(validation)} validation users): {fusion_info}")
    print(f"wrote {args.out} in {payload['seconds']} s")
    return payload


def print_table(suite: str, n_cases: int, rows: Mapping[str, Mapping[str, float]]) -> None:
    """One suite as a fixed-width table; the published NDCG@10 beside, where there is one."""
    cols = [f"{m}@{k}" for m in ("ndcg", "hr") for k in KS]
    print(f"\n== {suite} ({n_cases} users) ==")
    print(f"{'ranker':12s}" + "".join(f"{c:>9s}" for c in cols) + "  published NDCG@10")
    for name, m in rows.items():
        pub = ""
        if suite == "Games-200.random" and name in OUR_TO_PUBLISHED:
            pub = f"  {OUR_TO_PUBLISHED[name]} {PUBLISHED_NDCG10_RANDOM[OUR_TO_PUBLISHED[name]]}"
        print(f"{name:12s}" + "".join(f"{m[c]:9.2f}" for c in cols) + pub)
    if suite == "Games-200.random":
        for label in ("BPRMF (trained)", "SASRec (trained)", "GPT-4", "ChatGPT recency-focused"):
            print(f"{'':12s}{'':72s}  {label} {PUBLISHED_NDCG10_RANDOM[label]}")


if __name__ == "__main__":
    main()
