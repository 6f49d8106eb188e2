"""Non-LLM rankers for ranking cases, all behind one ``Ranker`` protocol.

A ranker returns every candidate, best first, with a score. Single-source rankers break ties by
a seeded per-case random order (never by the candidate order, which would leak the position of
the ground truth in the position-bias variants). The fused ranker z-scores each source's scores
across a case's candidates and takes a weighted sum; the weights are fitted on validation users
by :func:`fit_fusion_weights` (listwise softmax, as in ListNet, Cao et al., ICML 2007).

LLM rankers plug in by implementing the same protocol (and may use :class:`FusedRanker` as
a prior or fallback).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from eval.protocols import RankingCase, case_rng
from retrieval.covisit import CoVisitation
from retrieval.popularity import Popularity

Ranking = list[tuple[str, float]]


@runtime_checkable
class Ranker(Protocol):
    """Ranks a case's candidates: all of them, best first, each with its score."""

    name: str

    def rank(self, case: RankingCase) -> Ranking: ...


@runtime_checkable
class Scorer(Protocol):
    """One evidence source: a score per candidate (higher is better)."""

    name: str

    def score(self, case: RankingCase) -> dict[str, float]: ...


def order_by_scores(case: RankingCase, scores: Mapping[str, float], seed: int = 0) -> Ranking:
    """All candidates sorted by score, ties broken by a seeded per-case random order."""
    rng = case_rng(seed, f"tie:{case.user_id}")
    jitter = {c: rng.random() for c in case.candidates}
    ordered = sorted(case.candidates, key=lambda c: (-scores.get(c, 0.0), jitter[c]))
    return [(c, float(scores.get(c, 0.0))) for c in ordered]


@dataclass
class ScoreRanker:
    """A ranker from one scorer."""

    scorer: Scorer
    seed: int = 0

    @property
    def name(self) -> str:
        return self.scorer.name

    def rank(self, case: RankingCase) -> Ranking:
        return order_by_scores(case, self.scorer.score(case), self.seed)


class RandomRanker:
    """A seeded random order: the floor (expected NDCG@10 with 20 candidates: 22.7)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rank(self, case: RankingCase) -> Ranking:
        return order_by_scores(case, {}, self.seed)


# --- evidence sources ------------------------------------------------------------------------


@dataclass
class PopularityScorer:
    """log(1 + training count) of each candidate."""

    model: Popularity
    name: str = "pop"

    def score(self, case: RankingCase) -> dict[str, float]:
        return self.model.score(case.candidates, log=True)


@dataclass
class CoVisitationScorer:
    """Recency-weighted co-visitation from the history, log(1 + score) (see retrieval/covisit.py)."""

    model: CoVisitation
    name: str = "covisit"

    def score(self, case: RankingCase) -> dict[str, float]:
        raw = self.model.score(case.history, case.candidates)
        return {c: math.log1p(v) for c, v in raw.items()}


@dataclass
class InHistoryScorer:
    """1.0 for a candidate the user already has. In LLMRank's Games data a target never repeats
    a history item (0 of 5,800 validation users), so fusion learns a negative weight."""

    name: str = "in_history"

    def score(self, case: RankingCase) -> dict[str, float]:
        seen = set(case.history)
        return {c: float(c in seen) for c in case.candidates}


class SequenceModel(Protocol):
    """A trained next-item model, e.g. ``retrieval.sasrec.SASRecModel``."""

    def score(self, history: Sequence[str], candidates: Sequence[str]) -> dict[str, float]: ...


@dataclass
class SequenceModelScorer:
    """A trained sequential recommender's next-item score (e.g. SASRec's logit) as a source."""

    model: SequenceModel
    name: str = "sasrec"

    def score(self, case: RankingCase) -> dict[str, float]:
        return self.model.score(case.history, case.candidates)


class BM25Scorer:
    """BM25 (Robertson & Zaragoza 2009) over item titles; the query is the user's recent titles.

    Args:
        titles: item id -> title (HTML unescaped).
        n_recent: how many of the most recent history titles form the query.
    """

    def __init__(self, titles: Mapping[str, str], n_recent: int = 5, name: str = "bm25") -> None:
        import bm25s  # deferred: only this scorer needs it

        self.name = name
        self.n_recent = n_recent
        self._titles = dict(titles)
        self._ids = list(self._titles)
        self._row = {item: i for i, item in enumerate(self._ids)}
        corpus = bm25s.tokenize(
            [self._titles[i] for i in self._ids], stopwords="en", return_ids=False,
            show_progress=False,
        )
        self._retriever = bm25s.BM25()
        self._retriever.index(corpus, show_progress=False)
        self._vocab = set(self._retriever.vocab_dict)
        self._bm25s = bm25s

    def score(self, case: RankingCase) -> dict[str, float]:
        recent = [self._titles.get(i, "") for i in case.history[-self.n_recent :]]
        tokens = self._bm25s.tokenize(
            [" ".join(recent)], stopwords="en", return_ids=False, show_progress=False
        )[0]
        tokens = [t for t in tokens if t in self._vocab]
        if not tokens:
            return {c: 0.0 for c in case.candidates}
        scores = self._retriever.get_scores(tokens)
        return {
            c: float(scores[self._row[c]]) if c in self._row else 0.0 for c in case.candidates
        }


class EmbeddingScorer:
    """Cosine similarity of title embeddings: candidate vs. the recency-weighted mean of the
    most recent history items (unit vectors, shape ``(n_items, dim)`` float32).

    Args:
        ids: item ids, one per row of ``vectors``.
        vectors: L2-normalised title embeddings (e.g. retrieval/embedder.py's all-MiniLM-L6-v2).
        n_recent: how many recent history items form the user vector.
        recency: weight of the k-th most recent item: ``recency ** k``.
    """

    def __init__(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        n_recent: int = 5,
        recency: float = 0.7,
        name: str = "embedding",
    ) -> None:
        if len(ids) != vectors.shape[0]:
            raise ValueError(f"{len(ids)} ids but {vectors.shape[0]} vectors")
        self.name = name
        self.n_recent = n_recent
        self.recency = recency
        self._row = {item: i for i, item in enumerate(ids)}
        self._vectors = vectors.astype(np.float32, copy=False)

    def score(self, case: RankingCase) -> dict[str, float]:
        recent = [i for i in case.history[::-1][: self.n_recent] if i in self._row]
        if not recent:
            return {c: 0.0 for c in case.candidates}
        w = np.array([self.recency**k for k in range(len(recent))], dtype=np.float32)
        user = (w[:, None] * self._vectors[[self._row[i] for i in recent]]).sum(0)
        user /= max(float(np.linalg.norm(user)), 1e-12)
        return {
            c: float(self._vectors[self._row[c]] @ user) if c in self._row else 0.0
            for c in case.candidates
        }


# --- fusion ----------------------------------------------------------------------------------


def feature_matrix(case: RankingCase, scorers: Sequence[Scorer]) -> np.ndarray:
    """Per-case z-scored source scores, shape ``(n_candidates, n_sources)`` float64.

    A source constant over the case (e.g. no co-visitation evidence) contributes zeros.
    """
    cols = []
    for s in scorers:
        raw = s.score(case)
        col = np.array([raw.get(c, 0.0) for c in case.candidates], dtype=np.float64)
        std = col.std()
        cols.append((col - col.mean()) / std if std > 1e-12 else np.zeros_like(col))
    return np.stack(cols, axis=1)


def fit_fusion_weights(
    features: Sequence[np.ndarray],
    target_index: Sequence[int],
    l2: float = 1e-3,
    steps: int = 500,
    lr: float = 0.1,
) -> np.ndarray:
    """Fit fusion weights by listwise softmax cross-entropy (ListNet top-1) with Adam.

    Args:
        features: per case, :func:`feature_matrix` output ``(n_candidates, n_sources)``.
        target_index: per case, the row of the ground truth.
        l2: ridge penalty on the weights.

    Returns:
        weights, shape ``(n_sources,)``.
    """
    x = np.stack(features)  # (n_cases, n_cand, n_src); cases must share n_candidates
    y = np.asarray(target_index)
    n, _, d = x.shape
    w = np.zeros(d)
    m = np.zeros(d)
    v = np.zeros(d)
    for t in range(1, steps + 1):
        logits = x @ w
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(n), y] -= 1.0
        grad = np.einsum("nc,ncd->d", p, x) / n + 2 * l2 * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad**2
        w -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return w


class FusedRanker:
    """Weighted sum of per-case z-scored source scores.

    Args:
        scorers: the sources, in the order of ``weights``.
        weights: one weight per source (from :func:`fit_fusion_weights`).
    """

    def __init__(
        self, scorers: Sequence[Scorer], weights: Sequence[float], name: str = "fused", seed: int = 0
    ) -> None:
        if len(scorers) != len(weights):
            raise ValueError(f"{len(scorers)} scorers but {len(weights)} weights")
        self.name = name
        self.scorers = list(scorers)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = seed

    def scores(self, case: RankingCase) -> dict[str, float]:
        fused = feature_matrix(case, self.scorers) @ self.weights
        return dict(zip(case.candidates, fused.tolist(), strict=True))

    def rank(self, case: RankingCase) -> Ranking:
        return order_by_scores(case, self.scores(case), self.seed)
