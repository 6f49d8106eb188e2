"""Top-K ranking metrics as plain functions, with a name -> function registry.

Every per-case function takes the ranked ids (best first) and the set of relevant ids and
returns a float in [0, 1]. The aggregate helpers return means x100, the convention of
LLMRank's trainer (RUCAIBox/LLMRank `llmrank/trainer.py`, which multiplies RecBole's
averaged metrics by 100 before printing), so our numbers sit beside the published ones.

Leave-one-out evaluation (one relevant item per case) is the common case; the functions also
handle several relevant items.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence

MetricFn = Callable[[Sequence[str], Collection[str], int], float]


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def hit_rate_at_k(ranked_ids: Sequence[str], relevant_ids: Collection[str], k: int) -> float:
    """HR@K: 1.0 if any relevant id is in the top k, else 0.0.

    With one relevant item per case this equals Recall@K, which is why LLMRank reports it
    as "Recall" (Hou et al., ECIR 2024, Table 2).

    Raises:
        ValueError: if k < 1.
    """
    _check_k(k)
    relevant = set(relevant_ids)
    return 1.0 if any(item in relevant for item in ranked_ids[:k]) else 0.0


def recall_at_k(ranked_ids: Sequence[str], relevant_ids: Collection[str], k: int) -> float:
    """Recall@K: |relevant in top k| / |relevant|; 0.0 when nothing is relevant.

    Raises:
        ValueError: if k < 1.
    """
    _check_k(k)
    relevant = set(relevant_ids)
    if not relevant:
        return 0.0
    hits = len(relevant.intersection(ranked_ids[:k]))
    return hits / len(relevant)


def ndcg_at_k(ranked_ids: Sequence[str], relevant_ids: Collection[str], k: int) -> float:
    """NDCG@K with binary relevance and a log2 discount.

    DCG@K = sum over ranks r <= k holding a relevant id of 1 / log2(r + 1); it is divided by
    the ideal DCG, the DCG of a list with all min(k, |relevant|) relevant ids on top
    (Järvelin & Kekäläinen, "Cumulated gain-based evaluation of IR techniques", ACM TOIS 2002).
    With a single relevant id at rank r <= k this is 1 / log2(r + 1).

    Raises:
        ValueError: if k < 1.
    """
    _check_k(k)
    relevant = set(relevant_ids)
    if not relevant:
        return 0.0
    dcg = sum(
        1.0 / math.log2(rank + 1)
        for rank, item in enumerate(ranked_ids[:k], start=1)
        if item in relevant
    )
    idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / idcg


def mrr(ranked_ids: Sequence[str], relevant_ids: Collection[str], k: int | None = None) -> float:
    """Reciprocal rank of the first relevant id (within the top k if k is given), else 0.0.

    Voorhees, "The TREC-8 Question Answering Track Report", 1999.

    Raises:
        ValueError: if k is given and < 1.
    """
    if k is not None:
        _check_k(k)
    relevant = set(relevant_ids)
    for rank, item in enumerate(ranked_ids[:k] if k is not None else ranked_ids, start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def _mrr_at_k(ranked_ids: Sequence[str], relevant_ids: Collection[str], k: int) -> float:
    return mrr(ranked_ids, relevant_ids, k)


METRICS: dict[str, MetricFn] = {
    "hr": hit_rate_at_k,
    "ndcg": ndcg_at_k,
    "recall": recall_at_k,
    "mrr": _mrr_at_k,
}
"""Registry: metric name -> per-case function(ranked_ids, relevant_ids, k)."""


def get_metric(name: str) -> MetricFn:
    """Look up a metric by registry name (``hr``, ``ndcg``, ``recall``, ``mrr``).

    Raises:
        KeyError: with the known names, if ``name`` is not registered.
    """
    try:
        return METRICS[name]
    except KeyError as e:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}") from e


def mean_at_k(
    name: str,
    rankings: Sequence[Sequence[str]],
    relevant: Sequence[Collection[str]],
    k: int,
) -> float:
    """Mean of one metric over cases, x100 (LLMRank's convention).

    Args:
        name: registry name of the metric.
        rankings: per case, ranked ids best first. A case with no valid answer should be passed
            as an empty ranking so that it counts as a miss (the mean is over all cases).
        relevant: per case, the relevant ids.
        k: cut-off.

    Raises:
        ValueError: if the two sequences differ in length or are empty.
    """
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings but {len(relevant)} relevance sets")
    if not rankings:
        raise ValueError("no cases to average")
    fn = get_metric(name)
    return 100.0 * sum(fn(r, rel, k) for r, rel in zip(rankings, relevant, strict=True)) / len(
        rankings
    )


def evaluate_rankings(
    rankings: Sequence[Sequence[str]],
    relevant: Sequence[Collection[str]],
    ks: Iterable[int] = (1, 5, 10, 20),
    names: Iterable[str] = ("ndcg", "hr"),
) -> dict[str, float]:
    """All requested metrics at all cut-offs, x100, keyed like ``"ndcg@10"``.

    Raises:
        ValueError: as :func:`mean_at_k`.
        KeyError: for an unknown metric name.
    """
    ks = list(ks)
    return {
        f"{name}@{k}": mean_at_k(name, rankings, relevant, k) for name in names for k in ks
    }


# ---- calibration (probabilities against 0/1 outcomes) ----------------------------------------


def calibration_bins(y: Sequence[int], p: Sequence[float], n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1]: mean predicted, observed rate and count per non-empty bin.

    Args:
        y: 0/1 outcomes (a positive label, or "the answer was right"), length n.
        p: predicted probabilities of y = 1 in [0, 1], length n.
    """
    bins: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for yi, pi in zip(y, p, strict=True):
        bins[min(n_bins - 1, int(pi * n_bins))].append((int(yi), float(pi)))
    return [{"bin": b, "mean_p": sum(x[1] for x in v) / len(v), "rate": sum(x[0] for x in v) / len(v),
             "n": len(v)} for b, v in sorted(bins.items())]


def expected_calibration_error(y: Sequence[int], p: Sequence[float], n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed rate - mean predicted| over equal-width bins
    (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017). For a classifier's
    confidence, y is "the answer was right" and p the confidence. 0.0 for no cases."""
    if not len(y):
        return 0.0
    return float(sum(b["n"] * abs(b["rate"] - b["mean_p"]) for b in calibration_bins(y, p, n_bins)) / len(y))
