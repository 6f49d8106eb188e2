"""Train SASRec on LLMRank's Games data, evaluate it alone and as one more fused source.

    python -m eval.train_sasrec [--epochs 20] [--out var/models/sasrec-games]
                                [--results /tmp/sasrec_results.json] [--load]

Data, exactly as eval/run_llmrank_baselines.py (no evaluated user's target is ever seen):

* Trained on every user's history of ``Games-6k.test.inter.gz`` (histories precede targets)
  plus the full sequence (history + target) of users in neither Games-6k (random or pop) nor
  Games-200; next-item prediction at every position.
* Validation users: the 5,800 users of ``Games-6k.random`` outside Games-200. They choose the
  best epoch (early stopping) and the fusion weights, so validation numbers are slightly
  optimistic. Test users: Games-200, scored once, ``random`` candidates (LLMRank protocol,
  20 candidates; published SASRec NDCG@10 75.92).
* Fusion: the baseline sources of :data:`eval.run_llmrank_baselines.FUSED_SOURCES`, with and
  without SASRec, weights refitted on validation users (``fit_fusion_weights``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from eval.baselines import (
    Scorer,
    ScoreRanker,
    SequenceModelScorer,
    feature_matrix,
    fit_fusion_weights,
    order_by_scores,
)
from eval.metrics import evaluate_rankings
from eval.protocols import (
    DEFAULT_SEED,
    RankingCase,
    llmrank_cases,
    load_llmrank_candidates,
    load_llmrank_interactions,
    load_llmrank_titles,
)
from eval.run_llmrank_baselines import (
    FUSED_SOURCES,
    KS,
    PUBLISHED_NDCG10_RANDOM,
    build_scorers,
    default_data_dir,
    default_workspace,
    print_table,
    score_ranker,
    title_embeddings,
    training_sequences,
)
from retrieval.sasrec import SASRec, SASRecConfig, SASRecModel


def ndcg10(model: SASRecModel, cases: Sequence[RankingCase]) -> float:
    """SASRec-alone NDCG@10 x100 over ``cases`` (batched; ties by candidate order)."""
    scores = model.score_batch([c.history for c in cases], [c.candidates for c in cases])
    ranked = [sorted(c.candidates, key=lambda x, s=s: -s[x]) for c, s in zip(cases, scores,
                                                                               strict=True)]
    return evaluate_rankings(ranked, [{c.target} for c in cases], ks=(10,),
                             names=("ndcg",))["ndcg@10"]


def fused_metrics(
    cases: Sequence[RankingCase], feats: Sequence[np.ndarray], weights: np.ndarray, seed: int
) -> dict[str, float]:
    """NDCG/HR@K x100 of the weighted sum of precomputed z-scored features."""
    rankings = []
    for case, x in zip(cases, feats, strict=True):
        scores = dict(zip(case.candidates, (x @ weights).tolist(), strict=True))
        rankings.append([c for c, _ in order_by_scores(case, scores, seed)])
    return evaluate_rankings(rankings, [{c.target} for c in cases], ks=KS)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="model folder; default "
                    "<workspace>/models/sasrec-games")
    ap.add_argument("--results", type=Path, default=Path("/tmp/sasrec_results.json"))
    ap.add_argument("--load", action="store_true", help="evaluate the saved model, no training")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dropout", type=float, default=0.5)
    ap.add_argument("--negatives", type=int, default=1024,
                    help="uniform negatives per step (sampled softmax); 0: full softmax")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--max-minutes", type=float, default=14.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--no-embedding", action="store_true", help="skip the MiniLM title source")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    root = (args.data_dir or default_data_dir()) / "amazon-games"
    out = args.out or default_workspace() / "models" / "sasrec-games"
    interactions = load_llmrank_interactions(root)
    cand200 = load_llmrank_candidates(root / "Games-200" / "Games.random")
    cand6k = {s: load_llmrank_candidates(root / f"Games-6k.{s}.gz") for s in ("random", "pop")}
    test_users = list(cand200)
    validation_users = [u for u in cand6k["random"] if u not in set(test_users)]
    held_out = set(test_users) | set(cand6k["random"]) | set(cand6k["pop"])
    train = training_sequences(interactions, held_out)
    validation = llmrank_cases(interactions, cand6k["random"], validation_users,
                               seed=args.seed, source="random")
    test = llmrank_cases(interactions, cand200, seed=args.seed, source="random")

    if args.load:
        model = SASRecModel.load(out)
    else:
        config = SASRecConfig(dropout=args.dropout)
        model = SASRec(config).fit(
            train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            max_minutes=args.max_minutes, patience=args.patience,
            n_negatives=args.negatives or None,
            validate=lambda m: ndcg10(m, validation),
        )
        model.save(out)
        print(f"saved {out} ({model.info['seconds']} s training)")

    sasrec = SequenceModelScorer(model)
    suites = {"Games-6k.random (validation users)": validation, "Games-200.random": test}
    alone = {name: score_ranker(ScoreRanker(sasrec, args.seed), cases)
             for name, cases in suites.items()}

    titles = load_llmrank_titles(root)
    embeddings = None
    if not args.no_embedding:
        embeddings = title_embeddings(titles, default_workspace() / "cache")
    scorers: dict[str, Scorer] = dict(build_scorers(train, titles, embeddings))
    base_names = [n for n in FUSED_SOURCES if n in scorers]
    names = [*base_names, "sasrec"]
    sources = [scorers[n] for n in base_names] + [sasrec]
    feats = {name: [feature_matrix(c, sources) for c in cases] for name, cases in suites.items()}
    val_feats, val_y = feats[next(iter(suites))], [c.target_index for c in validation]
    half = len(validation) // 2

    fusion: dict[str, dict[str, object]] = {}
    results: dict[str, dict[str, dict[str, float]]] = {s: {} for s in suites}
    for label, cols in (("fused", list(range(len(base_names)))),
                        ("fused+sasrec", list(range(len(names))))):
        weights = fit_fusion_weights([x[:, cols] for x in val_feats], val_y)
        w_half = fit_fusion_weights([x[:, cols] for x in val_feats[:half]], val_y[:half])
        check = fused_metrics(validation[half:], [x[:, cols] for x in val_feats[half:]],
                              w_half, args.seed)
        fusion[label] = {"split_half_ndcg@10": check["ndcg@10"],
                         **{f"w_{names[c]}": float(w) for c, w in zip(cols, weights,
                                                                        strict=True)}}
        for suite, cases in suites.items():
            results[suite][label] = fused_metrics(
                cases, [x[:, cols] for x in feats[suite]], weights, args.seed)
    for suite in suites:
        results[suite] = {"sasrec": alone[suite], **results[suite]}
        print_table(suite, len(suites[suite]), results[suite])

    payload: dict[str, object] = {
        "protocol": "LLMRank (Hou et al., ECIR 2024): 19 random negatives + ground truth, "
                    "shuffled per case with seed",
        "seed": args.seed, "model_dir": str(out), "n_train_sequences": len(train),
        "fit_on": "all histories + full sequences of users outside Games-6k/Games-200",
        "sasrec": {"config": asdict(model.config), "training": model.info},
        "fusion": fusion, "published_ndcg@10_random": PUBLISHED_NDCG10_RANDOM,
        "results": results, "seconds": round(time.time() - t0, 1),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=2))
    print(f"\nfusion weights (fitted on {len(validation)} validation users): {fusion}")
    print(f"wrote {args.results} in {payload['seconds']} s")
    return payload


if __name__ == "__main__":
    main()
