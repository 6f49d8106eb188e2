"""LLM rankers for ranking cases, async, beside the non-LLM ones of ``eval/baselines.py``.

Each ranker has ``name``, ``async arank(case) -> RankOutcome`` and a sync ``rank(case)`` (the
``Ranker`` protocol). ``RankOutcome`` carries what the runner writes per case: the ranking, the
raw model responses, validity, tokens and latency.

* :class:`VerbalizerRanker` (``llm``, ``llm-perm``): letter labels, read the label
  log-probabilities (LlamaRec), averaged over candidate permutations (LLMRank).
* :class:`GenerateRanker` (``llm-generate``): the model writes the ranking as a JSON list of
  letters (LLMRank's way); missing labels go last, invalid answers are counted.
* :class:`FewShotRanker` (``llm-fewshot``): the verbalizer with demonstrations from other,
  similar users (never the evaluated user).
* :class:`PointwiseRanker` (``llm-pointwise``): one yes/no question per candidate, scored by
  ``log P(yes) - log P(no)`` (`agent.llm.pointwise`); position-free by construction.
* :class:`HybridRanker` (``hybrid``, ``hybrid-pointwise``): fused non-LLM z-scores + ``w`` *
  the z-scored LLM feature (the verbalizer's log-probability, or the pointwise log-odds).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.llm.pointwise import pointwise_scores
from agent.llm.prompting import PromptTemplate, render
from agent.llm.verbalizer import LABELS, verbalizer_scores
from eval.baselines import FusedRanker, Ranking, order_by_scores
from eval.cache import Recorder
from eval.protocols import RankingCase, case_rng

N_HISTORY = 15  # titles shown to the model, most recent last
TITLE_CHARS = 120  # long Amazon titles are cut: the tail is mostly edition/platform noise


@dataclass
class RankOutcome:
    """One ranked case with its bookkeeping (tokens, latency in seconds, raw responses)."""

    ranking: Ranking
    valid: bool = True
    responses: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_latency_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    prompt: list[dict[str, str]] | None = None


def short_title(titles: Mapping[str, str], item: str) -> str:
    t = titles.get(item, f"item {item}")
    return t if len(t) <= TITLE_CHARS else t[: TITLE_CHARS - 1].rstrip() + "…"


def history_vars(case: RankingCase, titles: Mapping[str, str], n: int = N_HISTORY) -> dict[str, Any]:
    """Template variables for the title history: the last ``n`` titles, most recent last."""
    return {
        "history": [short_title(titles, i) for i in case.history[-n:]],
        "n_history": len(case.history),
    }


def _usage(rec: Recorder) -> tuple[int, int, float]:
    p = sum(c["usage"]["prompt_tokens"] for c in rec.calls)
    c = sum(c["usage"]["completion_tokens"] for c in rec.calls)
    lat = sum(c["latency_s"] for c in rec.calls)
    return p, c, lat


class _SyncMixin:
    def rank(self, case: RankingCase) -> Ranking:
        return asyncio.run(self.arank(case)).ranking  # type: ignore[attr-defined]


class VerbalizerRanker(_SyncMixin):
    """Label log-probability ranking over the case's candidates.

    Args:
        model: a ``ChatModel`` (usually a ``CachedModel``).
        template: a verbalizer template (``next_item_rank_titles.v1``).
        titles: item id -> title.
        permutations: candidate orders averaged (1 = the case order only).
        examples_fn: optional case -> demonstrations (few-shot); default none.
    """

    def __init__(
        self,
        model: Any,
        template: PromptTemplate,
        titles: Mapping[str, str],
        *,
        permutations: int = 1,
        seed: int = 0,
        name: str = "llm",
        examples_fn: Any = None,
        verb: str = "buy",
    ) -> None:
        self.model = model
        self.template = template
        self.titles = dict(titles)
        self._short = {k: short_title(titles, k) for k in titles}
        self.permutations = permutations
        self.seed = seed
        self.name = name
        self.examples_fn = examples_fn
        self.verb = verb

    feature = "logprob"  # what HybridRanker z-scores: log of the permutation-mean label probability

    async def llm_scores(self, case: RankingCase) -> tuple[dict[str, float], RankOutcome]:
        rec = Recorder(self.model)
        examples = self.examples_fn(case) if self.examples_fn else []
        res = await verbalizer_scores(
            rec, self.template, {**history_vars(case, self.titles), "examples": examples},
            case.candidates, self._short, permutations=self.permutations,
            seed=self.seed, verb=self.verb,
        )
        p, c, lat = _usage(rec)
        out = RankOutcome(
            ranking=[], valid=res.label_mass > 0.0, responses=rec.calls, prompt_tokens=p,
            completion_tokens=c, model_latency_s=lat, prompt=rec.first_messages,
            extra={"label_mass": round(res.label_mass, 6), "orders": res.orders,
                   "n_examples": len(examples)},
        )
        return res.scores, out

    async def arank(self, case: RankingCase) -> RankOutcome:
        scores, out = await self.llm_scores(case)
        out.ranking = order_by_scores(case, scores, self.seed)
        return out


class PointwiseRanker(_SyncMixin):
    """One yes/no question per candidate; rank by ``log P(yes) - log P(no)``.

    Args:
        model: a ``ChatModel`` (usually a ``CachedModel``).
        template: a pointwise template (``next_item_pointwise_titles.v1``).
        titles: item id -> title.
    """

    feature = "margin"  # HybridRanker z-scores the log-odds log P(yes) - log P(no) as they are

    def __init__(self, model: Any, template: PromptTemplate, titles: Mapping[str, str], *,
                 seed: int = 0, name: str = "llm-pointwise", verb: str = "buy") -> None:
        self.model = model
        self.template = template
        self._short = {k: short_title(titles, k) for k in titles}
        self.seed = seed
        self.name = name
        self.verb = verb

    async def llm_scores(self, case: RankingCase) -> tuple[dict[str, float], RankOutcome]:
        """(log P(yes) - log P(no) per candidate, the outcome without its ranking)."""
        rec = Recorder(self.model)
        res = await pointwise_scores(rec, self.template, {**history_vars(case, self._short), "verb": self.verb},
                                     case.candidates, self._short)
        p, c, lat = _usage(rec)
        out = RankOutcome(
            ranking=[], valid=res.answered > 0.0, responses=rec.calls, prompt_tokens=p,
            completion_tokens=c, model_latency_s=lat, prompt=rec.first_messages,
            extra={"answered": round(res.answered, 4), "margins": res.margins,
                   "cached_tokens": res.usage.cached_tokens},
        )
        return res.margins, out

    async def arank(self, case: RankingCase) -> RankOutcome:
        scores, out = await self.llm_scores(case)
        out.ranking = order_by_scores(case, scores, self.seed)
        return out


# --- generation ------------------------------------------------------------------------------


def generate_schema(labels: Sequence[str]) -> dict[str, Any]:
    """JSON schema of the generative answer: ``{"ranking": [label, ...]}``, closed label set."""
    return {
        "title": "ranking",
        "type": "object",
        "properties": {
            "ranking": {
                "type": "array",
                "items": {"type": "string", "enum": list(labels)},
                "maxItems": len(labels),
            }
        },
        "required": ["ranking"],
    }


def parse_generated(text: str, labels: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse a generated ranking into labels in order, first occurrence kept.

    Accepts ``{"ranking": [...]}`` or a bare list. Returns the valid labels in order and a
    report: ``parsed`` (JSON ok), ``n_invalid`` (labels outside the set), ``n_duplicate``,
    ``n_missing`` (labels never mentioned) and ``valid`` (parsed, no invalid or duplicate label,
    at least one label).
    """
    report: dict[str, Any] = {"parsed": False, "n_invalid": 0, "n_duplicate": 0}
    allowed = set(labels)
    try:
        data = json.loads(text)
        seq = data.get("ranking") if isinstance(data, dict) else data
        if not isinstance(seq, list):
            raise ValueError("no list")
        report["parsed"] = True
    except (ValueError, AttributeError):
        seq = []
    out: list[str] = []
    for x in seq:
        lab = str(x).strip().rstrip(".").upper() if isinstance(x, str | int) else ""
        if lab not in allowed:
            report["n_invalid"] += 1
        elif lab in out:
            report["n_duplicate"] += 1
        else:
            out.append(lab)
    report["n_missing"] = len(labels) - len(out)
    report["valid"] = bool(report["parsed"] and out and not report["n_invalid"]
                           and not report["n_duplicate"])
    return out, report


class GenerateRanker(_SyncMixin):
    """The model writes the ranking (LLMRank's generative ranking), schema-constrained.

    Labels the model did not list follow in a seeded random order (never the candidate order,
    which would leak the ground truth's position in the position-bias variants).
    """

    def __init__(self, model: Any, template: PromptTemplate, titles: Mapping[str, str], *,
                 seed: int = 0, name: str = "llm-generate", verb: str = "buy",
                 max_tokens: int = 200) -> None:
        self.model = model
        self.template = template
        self.titles = dict(titles)
        self.seed = seed
        self.name = name
        self.verb = verb
        self.max_tokens = max_tokens

    async def arank(self, case: RankingCase) -> RankOutcome:
        labels = LABELS[: len(case.candidates)]
        by_label = dict(zip(labels, case.candidates, strict=True))
        cands = [{"label": lab, "title": short_title(self.titles, i)} for lab, i in by_label.items()]
        messages = render(self.template, candidates=cands, verb=self.verb,
                          **history_vars(case, self.titles))
        rec = Recorder(self.model)
        comp = await rec.complete(messages, schema=generate_schema(labels),
                                  max_tokens=self.max_tokens, temperature=0.0)
        order, report = parse_generated(comp.text, labels)
        n = len(case.candidates)
        scores = {by_label[lab]: float(n - r) for r, lab in enumerate(order)}
        p, c, lat = _usage(rec)
        return RankOutcome(
            ranking=order_by_scores(case, scores, self.seed), valid=report["valid"],
            responses=rec.calls, prompt_tokens=p, completion_tokens=c, model_latency_s=lat,
            prompt=messages, extra=report,
        )


# --- few-shot demonstrations from similar users ---------------------------------------------


class SimilarUserDemos:
    """Demonstrations from the nearest *other* users by recent-title embedding.

    The pool is users whose whole sequence is training data (never an evaluated or validation
    user); a demonstration is their last ``n_history`` titles before their last item, and
    ``n_candidates`` labelled candidates: their last item plus random catalogue items, in a
    seeded order. The evaluated user's id is excluded, so their own target is never shown.

    Args:
        pool: user id -> full sequence (oldest first) of training users.
        ids, vectors: item ids and unit title vectors ``(n_items, dim)``.
        titles: item id -> title.
    """

    def __init__(self, pool: Mapping[str, Sequence[str]], ids: Sequence[str], vectors: np.ndarray,
                 titles: Mapping[str, str], *, k: int = 1, n_history: int = 8,
                 n_candidates: int = 5, n_recent: int = 5, seed: int = 0) -> None:
        self.titles = titles
        self.k, self.n_history, self.n_candidates, self.seed = k, n_history, n_candidates, seed
        self.n_recent = n_recent
        self._row = {item: i for i, item in enumerate(ids)}
        self._vectors = vectors
        self._items = list(ids)
        users, vecs = [], []
        for u, seq in pool.items():
            if len(seq) < 3:
                continue
            v = self._user_vec(seq[:-1])
            if v is not None:
                users.append(u)
                vecs.append(v)
        self._users = users
        self._seqs = {u: list(pool[u]) for u in users}
        self._matrix = np.stack(vecs).astype(np.float32)

    def _user_vec(self, history: Sequence[str]) -> np.ndarray | None:
        rows = [self._row[i] for i in list(history)[::-1][: self.n_recent] if i in self._row]
        if not rows:
            return None
        w = np.array([0.7**k for k in range(len(rows))], dtype=np.float32)
        v = (w[:, None] * self._vectors[rows]).sum(0)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def __call__(self, case: RankingCase) -> list[dict[str, Any]]:
        v = self._user_vec(case.history)
        if v is None:
            return []
        sims = self._matrix @ v
        demos: list[dict[str, Any]] = []
        for j in np.argsort(-sims):
            u = self._users[int(j)]
            seq = self._seqs[u]
            answer = seq[-1]
            if u == case.user_id or answer in case.history:
                continue
            rng = case_rng(self.seed, f"demo:{case.user_id}:{u}")
            negs: list[str] = []
            while len(negs) < self.n_candidates - 1:
                x = self._items[rng.randrange(len(self._items))]
                if x != answer and x not in seq and x not in negs:
                    negs.append(x)
            order = [*negs, answer]
            rng.shuffle(order)
            labels = LABELS[: len(order)]
            demos.append({
                "user_id": u,
                "history": [short_title(self.titles, i) for i in seq[:-1][-self.n_history:]],
                "candidates": [{"label": lab, "title": short_title(self.titles, i)}
                               for lab, i in zip(labels, order, strict=True)],
                "answer": labels[order.index(answer)],
            })
            if len(demos) >= self.k:
                break
        return demos


# --- hybrid ------------------------------------------------------------------------------------


def zscore(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    s = x.std()
    return (x - x.mean()) / s if s > 1e-12 else np.zeros_like(x)


def llm_feature(v: float, feature: str = "logprob") -> float:
    """The LLM's hybrid feature from its score: ``log v`` of a probability (floored at 1e-9) for
    the verbalizer, or the pointwise log-odds as they are (``feature="margin"``)."""
    if feature == "margin":
        return v
    return math.log(max(v, 1e-9))


def hybrid_scores(
    case: RankingCase, fused: Mapping[str, float], llm_prob: Mapping[str, float], w: float,
    feature: str = "logprob",
) -> dict[str, float]:
    """z(fused) + w * z(LLM feature), per candidate (`llm_feature`: log-prob or log-odds; a
    candidate the LLM did not score gets probability 0 / margin 0)."""
    f = zscore([fused[c] for c in case.candidates])
    g = zscore([llm_feature(llm_prob.get(c, 0.0), feature) for c in case.candidates])
    return dict(zip(case.candidates, (f + w * g).tolist(), strict=True))


class HybridRanker(_SyncMixin):
    """Fused non-LLM sources plus an LLM ranker's feature, weight ``w`` chosen on validation users."""

    def __init__(self, fused: FusedRanker, llm: VerbalizerRanker | PointwiseRanker, w: float, *,
                 seed: int = 0, name: str = "hybrid") -> None:
        self.fused, self.llm, self.w, self.seed, self.name = fused, llm, w, seed, name

    async def arank(self, case: RankingCase) -> RankOutcome:
        t0 = time.perf_counter()
        fused = self.fused.scores(case)
        llm, out = await self.llm.llm_scores(case)
        out.ranking = order_by_scores(case, hybrid_scores(case, fused, llm, self.w, self.llm.feature),
                                      self.seed)
        out.extra["w"] = self.w
        out.extra["llm_prob"] = {c: round(v, 6) for c, v in llm.items()}
        out.extra["fused"] = {c: round(v, 6) for c, v in fused.items()}
        out.extra["wall_s"] = round(time.perf_counter() - t0, 3)
        return out


WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def choose_hybrid_weight(
    cases: Sequence[RankingCase],
    fused: Sequence[Mapping[str, float]],
    llm: Sequence[Mapping[str, float]],
    grid: Sequence[float] = WEIGHT_GRID,
    seed: int = 0,
    feature: str = "logprob",
) -> tuple[float, dict[str, float]]:
    """The grid weight with the best mean NDCG@10 on validation cases (ties: the smaller w).

    Returns:
        (w, {str(w): NDCG@10 x100 for every grid point}).
    """
    from eval.metrics import mean_at_k

    table: dict[str, float] = {}
    best_w, best = grid[0], -1.0
    for w in grid:
        rankings = [[c for c, _ in order_by_scores(case, hybrid_scores(case, f, g, w, feature), seed)]
                    for case, f, g in zip(cases, fused, llm, strict=True)]
        ndcg = mean_at_k("ndcg", rankings, [{c.target} for c in cases], 10)
        table[str(w)] = round(ndcg, 4)
        if ndcg > best + 1e-9:
            best_w, best = w, ndcg
    return best_w, table
