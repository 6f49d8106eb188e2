"""Candidate generation: the union of five retrieval sources, each score kept.

Sources (all built from the store by `agent.data.artifacts`):

* ``embedding``: item-index neighbours of the user's recent items (MiniLM over title +
  category + brand), recency-weighted.
* ``covisit``: what other users took after/with the same items (`retrieval.covisit`).
* ``similar_users``: items of the nearest users in the user index (user vector = recency-
  weighted mean of their item vectors).
* ``popularity``: the cold-start fallback and a prior.
* ``recent``: the items this user touched in their last `RECENT_WINDOW` events (viewed, carted,
  favourited, bought), each scored by the recency-decayed count of its events. Re-visits are the
  commonest next event in click-streams (68% of Taobao leave-one-out targets were viewed before;
  docs/results.md), and no other source can return an item the user already has.

Each source's scores are scaled to [0, 1] by its maximum for this user, then fused by a
weighted sum. Already-bought (or reviewed) items are excluded unless repurchase is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.covisit import CoVisitation
from retrieval.index import VectorIndex
from retrieval.popularity import Popularity

SOURCES = ("embedding", "covisit", "similar_users", "popularity", "recent")

# The `recent` source: the last RECENT_WINDOW events, each worth RECENT_DECAY ** age (age 0 =
# the newest event), summed per item: an item viewed three times lately outranks one seen once.
# 0.95 per event halves an event's weight about 14 events back (a browsing session), set by hand.
RECENT_WINDOW = 100
RECENT_DECAY = 0.95

# Fusion weights: co-visitation carries the behavioural signal, similar users the taste,
# embedding the content match, popularity only breaks ties (tuned on Online Retail
# leave-last-basket validation users; see docs/results.md). `recent` was added later, set by
# hand below co-visitation: it only reaches items the user touched, which purchase-only shops
# exclude unless repurchase is asked for. `shoplens train` fits all five per dataset.
DEFAULT_WEIGHTS: dict[str, float] = {
    "covisit": 0.45,
    "similar_users": 0.25,
    "embedding": 0.2,
    "popularity": 0.1,
    "recent": 0.3,
}


@dataclass
class Candidate:
    item_id: str
    source_scores: dict[str, float] = field(default_factory=dict)  # each in [0, 1]
    fused: float = 0.0


def recency_weights(n: int, decay: float = 0.8) -> np.ndarray:
    """Weights for n items ordered oldest -> newest: newest 1, then decay, decay**2, ... ."""
    return decay ** np.arange(n - 1, -1, -1, dtype=np.float32)


def user_vector(item_ids: Sequence[str], item_index: VectorIndex, decay: float = 0.9) -> np.ndarray | None:
    """Recency-weighted mean of the item vectors of `item_ids` (oldest first), unit-normalised.

    Returns None when no item is in the index (cold start)."""
    vecs, ws = [], []
    weights = recency_weights(len(item_ids), decay)
    for w, i in zip(weights, item_ids, strict=True):
        v = item_index.vector(i)
        if v is not None:
            vecs.append(v)
            ws.append(w)
    if not vecs:
        return None
    u = np.average(np.stack(vecs), axis=0, weights=np.asarray(ws))
    n = float(np.linalg.norm(u))
    return (u / n).astype(np.float32) if n > 0 else None


def recent_scores(history: Sequence[str], *, window: int = RECENT_WINDOW,
                  decay: float = RECENT_DECAY) -> dict[str, float]:
    """The `recent` source: item id -> sum of ``decay ** age`` over its events among the last
    `window` of `history` (item ids, oldest first; age 0 = the newest event). Unscaled; the
    empty history gives {}.

    >>> recent_scores(["a", "b", "a"], decay=0.5)
    {'a': 1.25, 'b': 0.5}
    """
    out: dict[str, float] = {}
    for age, item in enumerate(reversed(list(history)[-window:])):
        out[item] = out.get(item, 0.0) + decay**age
    return out


def max_scale(scores: Mapping[str, float]) -> dict[str, float]:
    """Positive scores divided by the largest, so each source's best is 1.0 (non-positive
    scores dropped; an empty or all-non-positive source gives {})."""
    top = max(scores.values(), default=0.0)
    if top <= 0:
        return {}
    return {k: max(0.0, v) / top for k, v in scores.items() if v > 0}


class CandidateGenerator:
    """Builds a fused candidate list for one user from prebuilt artifacts.

    Args:
        item_index: FAISS index over catalogue items.
        user_index: FAISS index over users (may be empty).
        user_items: user id -> that user's item ids, oldest first (for similar users).
        covisit: fitted co-visitation counts.
        popularity: fitted popularity counts.
        weights: fusion weight per source (missing sources count 0).
    """

    def __init__(
        self,
        item_index: VectorIndex,
        user_index: VectorIndex,
        user_items: Mapping[str, Sequence[str]],
        covisit: CoVisitation,
        popularity: Popularity,
        weights: Mapping[str, float] | None = None,
    ):
        self.item_index = item_index
        self.user_index = user_index
        self.user_items = user_items
        self.covisit = covisit
        self.popularity = popularity
        self.weights = dict(weights or DEFAULT_WEIGHTS)

    def _similar_users(self, history: Sequence[str], user_id: str | None) -> list[tuple[str, float]]:
        """(user id, cosine) of the 20 nearest other users with positive similarity to the
        history's user vector (its last 50 items); [] on cold start or an empty user index."""
        if not len(self.user_index):
            return []
        u = user_vector(list(history)[-50:], self.item_index)
        if u is None:
            return []
        return [(o, sim) for o, sim in self.user_index.search(u[None, :], 21)[0] if o != user_id and sim > 0]

    def _fused(self, scaled: Mapping[str, float]) -> float:
        """The weighted sum of one candidate's scaled source scores, over the sum of |weights|
        (learned weights may be negative)."""
        wsum = sum(abs(w) for w in self.weights.values()) or 1.0
        return sum(self.weights.get(s, 0.0) * v for s, v in scaled.items()) / wsum

    def source_scores(
        self, history: Sequence[str], *, user_id: str | None = None, per_source: int = 100
    ) -> dict[str, dict[str, float]]:
        """Raw per-source scores for a history (item ids, oldest first)."""
        recent = list(dict.fromkeys(reversed(history)))[:10]  # distinct, newest first
        out: dict[str, dict[str, float]] = {s: {} for s in SOURCES}
        # embedding neighbours of the recent items
        vecs = [(i, v) for i in recent if (v := self.item_index.vector(i)) is not None]
        if vecs:
            hits = self.item_index.search(np.stack([v for _, v in vecs]), 30)
            for age, row in enumerate(hits):
                w = 0.85**age
                for item, sim in row:
                    if sim > 0:
                        out["embedding"][item] = max(out["embedding"].get(item, 0.0), w * sim)
        out["covisit"] = self.covisit.score(list(history), top_n=per_source)
        for other, sim in self._similar_users(history, user_id):
            items = self.user_items.get(other, ())
            for rank, item in enumerate(reversed(list(dict.fromkeys(items))[-30:])):
                out["similar_users"][item] = out["similar_users"].get(item, 0.0) + sim * 0.97**rank
        pop = self.popularity.top(per_source)
        out["popularity"] = self.popularity.score(pop, log=True)
        out["recent"] = recent_scores(history)
        return out

    def candidate_scores(
        self, history: Sequence[str], item_ids: Sequence[str], *, user_id: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Raw per-source scores of a given candidate set (every id gets every source, 0.0 when
        the source does not link it to the history). The same four sources as `source_scores`,
        computed for these ids instead of retrieved: embedding = the best recency-weighted cosine
        to a recent item; co-visitation, popularity and recent score the ids directly; similar
        users = the summed similarity of the nearest users who have the item."""
        ids = list(dict.fromkeys(item_ids))
        recent = list(dict.fromkeys(reversed(history)))[:10]  # distinct, newest first
        out: dict[str, dict[str, float]] = {s: dict.fromkeys(ids, 0.0) for s in SOURCES}
        rvecs = [(0.85**age, v) for age, i in enumerate(recent) if (v := self.item_index.vector(i)) is not None]
        cvecs = {i: v for i in ids if (v := self.item_index.vector(i)) is not None}
        if rvecs and cvecs:
            sims = np.stack(list(cvecs.values())) @ np.stack([v for _, v in rvecs]).T  # (C, R) cosine
            weighted = sims * np.asarray([w for w, _ in rvecs], dtype=np.float32)[None, :]
            for item, best in zip(cvecs, weighted.max(axis=1).tolist(), strict=True):
                out["embedding"][item] = max(0.0, float(best))
        if history:
            out["covisit"] = self.covisit.score(list(history), candidates=ids)
        wanted = set(ids)
        for other, sim in self._similar_users(history, user_id):
            for item in wanted.intersection(self.user_items.get(other, ())):
                out["similar_users"][item] += sim
        out["popularity"] = self.popularity.score(ids, log=True)
        touched = recent_scores(history)
        out["recent"] = {i: touched.get(i, 0.0) for i in ids}
        return out

    def score(
        self, history: Sequence[str], item_ids: Sequence[str], *, user_id: str | None = None
    ) -> list[Candidate]:
        """The given candidates (a recommender's own candidate set, or a protocol's), each with
        its per-source scores scaled within the set and the fused score, best first (ties by
        id). Ids are de-duplicated; none is dropped: an id no source knows scores 0."""
        raw = self.candidate_scores(history, item_ids, user_id=user_id)
        scaled = {s: max_scale(v) for s, v in raw.items()}
        cands = []
        for item in dict.fromkeys(item_ids):
            src = {s: round(scaled[s].get(item, 0.0), 6) for s in SOURCES}
            cands.append(Candidate(item, src, self._fused(src)))
        return sorted(cands, key=lambda c: (-c.fused, c.item_id))

    def generate(
        self,
        history: Sequence[str],
        *,
        n: int = 20,
        user_id: str | None = None,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> list[Candidate]:
        """The `n` best candidates by fused score, best first; `exclude` is never returned.

        With an empty history only popularity contributes (cold start).
        """
        raw = self.source_scores(history, user_id=user_id)
        scaled = {s: max_scale(v) for s, v in raw.items()}
        pool: dict[str, Candidate] = {}
        for source, scores in scaled.items():
            for item, sc in scores.items():
                if item in exclude:
                    continue
                cand = pool.setdefault(item, Candidate(item))
                cand.source_scores[source] = round(sc, 6)
        for cand in pool.values():
            cand.fused = self._fused(cand.source_scores)
        ranked = sorted(pool.values(), key=lambda c: (-c.fused, c.item_id))
        return ranked[:n]
