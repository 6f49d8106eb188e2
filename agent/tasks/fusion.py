"""Learned fusion of the next-item sources: `shoplens train --dataset X`.

The served candidate generator fuses five sources (embedding, co-visitation, similar users,
popularity, recently touched) with one weight each. Without training it uses `agent.data.candidates.DEFAULT_WEIGHTS`
(set by hand on Online Retail). `fit_fusion` learns the weights of a dataset from its own
history, leave-one-out (the protocol of SASRec / LLMRank evaluation):

1. validation windows: for up to `n_users` users (seeded) with at least `min_len` items, the
   last item is the target and the rest the history; a window whose target no other event holds
   (a cold item) is skipped, as the eval harness skips it;
2. the sources are refit WITHOUT those targets (co-visitation, popularity and the user index
   from the sequences minus each window's last item; the item embeddings are reused), so no
   feature has seen the answer;
3. each window gives up to two candidate sets, scored by the served `CandidateGenerator.score`:
   the target with random catalogue items (LLMRank's protocol), and the served retrieval pool
   when it holds the target (see `window_features` for why the target is never added to a pool
   of top-scored negatives);
4. a scikit-learn logistic regression on the scaled source scores (is this the target?); its
   coefficients are the weights. Split-half: fitted on half the windows, NDCG@10 of default vs
   fitted weights on the other half is recorded per kind of set; weights that rank either kind
   worse than the defaults (by more than 0.5) are not served: the defaults are saved instead,
   with the metrics that say why. Nor is a fusion that one of its own sources, alone, beats on
   the held-out half (by more than 0.5 overall, no worse on either kind): that source is served
   alone. Otherwise the weights are refit on all windows.

The result is saved as ``fusion.json`` beside the dataset's indexes with a manifest (dataset,
catalogue hash, events hash, windows, seed, metrics, sha256) that is checked on load: another
dataset or catalogue, or an edited file, is an error naming both sides; events added since
training, or a changed catalogue, are not (weights do not go stale per event) but every
answer's `meta.notes` says so.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from agent.data.artifacts import DatasetArtifacts, build_user_index, catalog_hash
from agent.data.candidates import DEFAULT_WEIGHTS, SOURCES
from agent.tasks.signed_json import content_sha256, load_signed, read_signed, write_signed
from retrieval.covisit import CoVisitation
from retrieval.popularity import Popularity

FUSION_FILE = "fusion.json"
FORMAT = "shoplens.fusion.v1"


@dataclass
class Window:
    """One leave-one-out validation case: `history` (item ids, oldest first) -> `target`."""

    user_id: str
    history: list[str]
    target: str


@dataclass
class FittedFusion:
    """Per-source weights learned for one dataset, with what identifies their data."""

    weights: dict[str, float]
    dataset: str
    catalogue_hash: str
    events_hash: str
    n_windows: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    fitted_at: str = ""
    format: str = FORMAT
    stale: bool = field(default=False, compare=False)  # the store's events changed since (not saved)

    def sha256(self) -> str:
        return content_sha256(self, exclude=("fitted_at", "stale"))

    def note(self) -> str:
        """The line `meta.notes` carries when these weights rank an answer."""
        m = self.metrics
        gain = (f"; validation NDCG@10 {m['default_ndcg@10']:.2f} -> {m['fitted_ndcg@10']:.2f}"
                if "fitted_ndcg@10" in m else "")
        if m.get("kept_defaults"):
            gain += "; fitted weights did not beat the defaults on held-out windows, so the defaults are kept"
        if m.get("kept_single_source"):
            src = max(self.weights, key=lambda k: self.weights[k])
            gain += (f"; {src} alone ranked held-out windows better than any fusion "
                     f"({m.get(f'single_{src}_ndcg@10', 0.0):.2f}), so it ranks alone")
        old = "; events or items changed since (re-run `shoplens train` to refit)" if self.stale else ""
        return (f"fusion: fitted by `shoplens train` on {self.n_windows} windows ({self.fitted_at[:10]})"
                f"{gain}{old}")

    @property
    def missing_sources(self) -> list[str]:
        """Sources of the served generator (`SOURCES`) these weights have none for: they were
        fitted before the source existed."""
        return [s for s in SOURCES if s not in self.weights]

    def served(self) -> tuple[dict[str, float] | None, str]:
        """(weights to rank with, the `meta.notes` line). None means the current defaults: when
        training kept them, or when the file predates a source (serving it would give that
        source weight 0 without a word)."""
        if self.missing_sources:
            return None, (f"fusion: the weights fitted by `shoplens train` ({self.fitted_at[:10]}) predate "
                          f"source(s) {', '.join(self.missing_sources)}; default source weights until "
                          f"`shoplens train --dataset {self.dataset}` reruns")
        return (None if self.metrics.get("kept_defaults") else self.weights), self.note()


def sequences_hash(user_items: Mapping[str, Sequence[str]]) -> str:
    """sha256 (first 16 hex) of every user's item sequence, users sorted."""
    h = hashlib.sha256()
    for u in sorted(user_items):
        h.update(f"{u}\x1f{' '.join(user_items[u])}\x1e".encode())
    return h.hexdigest()[:16]


def validation_windows(user_items: Mapping[str, Sequence[str]], *, n_users: int = 2000,
                       min_len: int = 3, seed: int = 0) -> list[Window]:
    """Leave-one-out windows of up to `n_users` users with at least `min_len` items (seeded)."""
    eligible = sorted(u for u, s in user_items.items() if len(s) >= min_len)
    rng = random.Random(seed)
    rng.shuffle(eligible)
    return [Window(u, list(user_items[u][:-1]), user_items[u][-1]) for u in eligible[:n_users]]


def without_targets(arts: DatasetArtifacts, windows: Sequence[Window]) -> DatasetArtifacts:
    """The dataset's artifacts refit on every sequence minus its window's target (the item
    index is reused: embeddings do not see behaviour)."""
    held = {w.user_id for w in windows}
    seqs = {u: (s[:-1] if u in held else list(s)) for u, s in arts.user_items.items()}
    return replace(arts, user_items=seqs, covisit=CoVisitation(arts.covisit.config).fit(seqs.values()),
                   popularity=Popularity().fit(seqs.values()),
                   user_index=build_user_index(seqs, arts.item_index), review_penalties={})


def window_features(arts: DatasetArtifacts, w: Window, rng: random.Random, *, n: int = 20,
                    negatives: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A window's training sets, each ``(candidates, len(SOURCES))`` scaled source scores in `SOURCES`
    order with the target in row 0:

    * ``random``: the target and ``n - 1`` random items of `negatives` (default: the catalogue)
      the user never touched (LLMRank's protocol);
    * ``retrieved``: the served retrieval pool of `n` items, only when it holds the target. The
      whole history is excluded (windows carry item ids, not event types, so the served rule,
      "purchases excluded", cannot be applied): the `recent` source is learned from random sets.

    Negatives are never chosen by the scores being fitted unless the target was chosen the same
    way: a pool of top-scored negatives beside an always-added target teaches the model that a
    high score means "not the answer" (what a first version of this module learned: negative
    co-visitation weight, NDCG@10 66.8 -> 22.2 on Games-200)."""
    gen = arts.generator()
    seen = set(w.history) | {w.target}
    out: dict[str, np.ndarray] = {}

    def rows(ids: list[str]) -> np.ndarray:
        scored = {c.item_id: c.source_scores for c in gen.score(w.history, ids, user_id=w.user_id)}
        return np.asarray([[scored[i][s] for s in SOURCES] for i in ids], dtype=np.float64)

    pool_ids = [i for i in (arts.catalog if negatives is None else negatives) if i not in seen]
    easy = rng.sample(pool_ids, min(n - 1, len(pool_ids)))
    out["random"] = rows([w.target, *easy])
    pool = [c.item_id for c in gen.generate(w.history, n=n, user_id=w.user_id, exclude=set(w.history))]
    if w.target in pool:
        out["retrieved"] = rows([w.target, *(i for i in pool if i != w.target)])
    return out


def ndcg10_of(feats: Sequence[np.ndarray], weights: Mapping[str, float]) -> float:
    """Mean NDCG@10 x100 over windows whose target is row 0 (ties count against the target)."""
    w = np.asarray([weights.get(s, 0.0) for s in SOURCES])
    total = 0.0
    for f in feats:
        s = f @ w
        rank = int((s[1:] >= s[0]).sum())  # 0-based rank of the target, pessimistic on ties
        total += 1.0 / math.log2(rank + 2) if rank < 10 else 0.0
    return 100.0 * total / max(1, len(feats))


def _fit(feats: Sequence[np.ndarray], seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate(feats)
    y = np.concatenate([np.r_[1, np.zeros(len(f) - 1)] for f in feats])
    lr = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, random_state=seed).fit(x, y)
    return {s: round(float(c), 6) for s, c in zip(SOURCES, lr.coef_[0], strict=True)}


@dataclass
class HeldOut:
    """Validation windows and the sources refit without their targets (`held_out_windows`)."""

    artifacts: DatasetArtifacts  # every source refit without the windows' targets
    windows: list[Window]  # every validation window
    warm: list[Window]  # those whose target another event holds (the ones fitted on)
    counted: list[str]  # catalogue ids another event holds (the negatives), sorted


def held_out_windows(arts: DatasetArtifacts, *, n_users: int = 2000, seed: int = 0,
                     what: str = "training the fusion") -> HeldOut:
    """Leave-one-out validation windows of up to `n_users` users (seeded), the sources refit
    without their targets, and which windows are warm: the cases `fit_fusion` and the LLM-weight
    fit (`agent.tasks.llm_weight`) learn from.

    A target no other event holds is cold: every count-based source scores it 0, below any
    counted negative, so a fit on it learns "uncounted wins" (negative popularity weight). Such
    windows are not fitted on, and negatives come from counted items, as in the eval harness
    (`eval.store_protocols.warm_only`).

    Raises:
        ValueError: fewer than 20 users with 3+ items, or fewer than 20 warm windows; the message
            names `what` needed them.
    """
    windows = validation_windows(arts.user_items, n_users=n_users, seed=seed)
    if len(windows) < 20:
        raise ValueError(f"{arts.dataset}: {len(windows)} users with 3+ items; {what} needs "
                         "at least 20 (keep the default weights)")
    holdout = without_targets(arts, windows)
    warm = [w for w in windows if holdout.popularity.count.get(w.target, 0) > 0]
    if len(warm) < 20:
        raise ValueError(f"{arts.dataset}: {len(warm)} of {len(windows)} validation windows have a target "
                         f"another event holds; {what} needs at least 20 (keep the default weights)")
    counted = sorted(i for i in arts.catalog if holdout.popularity.count.get(i, 0) > 0)
    return HeldOut(holdout, windows, warm, counted)


def choose_served(metrics: Mapping[str, float], margin: float = 0.5) -> str:
    """What `fit_fusion` serves, from its held-out-half metrics (NDCG@10 x100 overall and per
    kind of set: ``fitted_ndcg@10_random``, ``default_...``, ``single_<source>_...``):

    * ``"default"`` when the fitted weights rank either kind worse than the defaults by more
      than `margin`;
    * a source's name when that source alone beats the choice so far overall by more than
      `margin` and is no worse on either kind (Amazon Beauty: the fit ranked 0.88 below
      co-visitation alone on test users, docs/results.md);
    * else ``"fitted"``.
    """
    kinds = ("random", "retrieved")
    chosen = ("default" if any(metrics[f"fitted_ndcg@10_{k}"] < metrics[f"default_ndcg@10_{k}"] - margin
                               for k in kinds) else "fitted")
    best = max(SOURCES, key=lambda src: metrics.get(f"single_{src}_ndcg@10", -1.0))
    if (metrics.get(f"single_{best}_ndcg@10", -1.0) > metrics[f"{chosen}_ndcg@10"] + margin
            and all(metrics[f"single_{best}_ndcg@10_{k}"] >= metrics[f"{chosen}_ndcg@10_{k}"] - margin
                    for k in kinds)):
        return best
    return chosen


def fit_fusion(arts: DatasetArtifacts, *, n_users: int = 2000, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> FittedFusion:
    """Learn the source weights of `arts`'s dataset (see the module docstring).

    Raises:
        ValueError: fewer than 20 users with `min_len` items, or fewer than 20 of their windows
            with a target another event holds (nothing to learn from).
    """
    ho = held_out_windows(arts, n_users=n_users, seed=seed)
    holdout, windows, warm, counted = ho.artifacts, ho.windows, ho.warm, ho.counted
    rng = random.Random(seed)
    sets: list[dict[str, np.ndarray]] = []
    for k, w in enumerate(warm):
        sets.append(window_features(holdout, w, rng, negatives=counted))
        if progress:
            progress(k + 1, len(warm))
    half = len(sets) // 2

    def flat(part: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        return [f for d in part for f in d.values()]

    first = _fit(flat(sets[:half]), seed)
    metrics: dict[str, float] = {"n_split_half": float(len(sets) - half),
                                 "n_cold_targets_skipped": float(len(windows) - len(warm))}
    for kind in ("random", "retrieved"):
        held = [d[kind] for d in sets[half:] if kind in d]
        metrics[f"n_{kind}"] = float(len(held))
        metrics[f"default_ndcg@10_{kind}"] = round(ndcg10_of(held, DEFAULT_WEIGHTS), 4)
        metrics[f"fitted_ndcg@10_{kind}"] = round(ndcg10_of(held, first), 4)
    metrics["default_ndcg@10"] = round(ndcg10_of(flat(sets[half:]), DEFAULT_WEIGHTS), 4)
    metrics["fitted_ndcg@10"] = round(ndcg10_of(flat(sets[half:]), first), 4)
    for src in SOURCES:
        alone = {t: float(t == src) for t in SOURCES}
        metrics[f"single_{src}_ndcg@10"] = round(ndcg10_of(flat(sets[half:]), alone), 4)
        for kd in ("random", "retrieved"):
            metrics[f"single_{src}_ndcg@10_{kd}"] = round(ndcg10_of([d[kd] for d in sets[half:] if kd in d], alone), 4)
    chosen = choose_served(metrics)
    if chosen in SOURCES:
        weights = {t: float(t == chosen) for t in SOURCES}
        metrics["kept_single_source"] = 1.0
    elif chosen == "default":
        weights = dict(DEFAULT_WEIGHTS)
        metrics["kept_defaults"] = 1.0
    else:
        weights = _fit(flat(sets), seed)
    return FittedFusion(weights=weights, dataset=arts.dataset, catalogue_hash=catalog_hash(arts.catalog),
                        events_hash=sequences_hash(arts.user_items), n_windows=len(windows), seed=seed,
                        metrics=metrics, fitted_at=datetime.now(UTC).isoformat(timespec="seconds"))


def save_fusion(fusion: FittedFusion, folder: Path) -> Path:
    """Write ``fusion.json`` (with its sha256) into the dataset's index folder."""
    return write_signed(fusion, folder / FUSION_FILE, exclude=("stale",))


def read_fusion(folder: Path) -> FittedFusion:
    """``fusion.json`` of a dataset's index folder as written, without the checks of
    `load_fusion` (for a version key that must not load the dataset).

    Raises:
        FileNotFoundError: `shoplens train` never ran for it.
    """
    return read_signed(folder / FUSION_FILE, FittedFusion)[0]


def load_fusion(folder: Path, dataset: str, catalogue_hash: str,
                user_items: Mapping[str, Sequence[str]]) -> FittedFusion | None:
    """The dataset's fitted weights, or None when `shoplens train` never ran for it.

    Raises:
        ArtifactMismatchError: the file was fitted for another dataset, or was edited (sha256);
            the message names both sides and the fix. Events or items changed since training
            only mark it `stale`.
    """
    path = folder / FUSION_FILE
    if not path.exists():
        return None
    fusion = load_signed(path, FittedFusion, dataset, f"re-run `shoplens train --dataset {dataset}` (or delete {path})")
    fusion.stale = (fusion.events_hash != sequences_hash(user_items)
                    or fusion.catalogue_hash != catalogue_hash)
    return fusion
