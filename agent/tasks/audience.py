"""Audience targeting: for an item (or a short campaign text), rank the users most likely to respond.

Sources, each scaled to [0, 1] by its maximum and fused by a weighted sum:

* ``repeat``: the user bought this item before (recency-weighted count).
* ``co_purchase``: the user bought items co-visited with this one (`retrieval.covisit`).
* ``similar_users``: the user FAISS index searched with the item's vector (or the campaign
  text's embedding): users whose recent items look like it.

The model (optional) scores the top few with a yes/no verbalizer and writes a one-line reason
citing the user's events. `AudienceIndex.build` takes events up to a cut-off, so evaluation
indexes never see the held-out month.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

from agent.data.artifacts import build_user_index
from agent.data.candidates import max_scale
from agent.domain.history import _STOP, build_history
from agent.domain.predictions import AudiencePrediction, AudienceReason, Evidence, TargetUser
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.domain.verify import TitleIndex
from agent.llm.base import ChatModel, ModelUnavailableError, OutputValidationError
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.tasks.common import ask_yes_no, evidence_from_refs, make_meta
from agent.tasks.verified import verified_reason
from retrieval.covisit import CoVisitation, CoVisitationConfig
from retrieval.index import VectorIndex

if TYPE_CHECKING:
    from agent.tasks.encoder_train import EncoderScorer

Source = Literal["repeat", "co_purchase", "similar_users", "predicted"]
# Item targeting: tuned on Online Retail 2011-10-09..11-08 (index built before it) by grid search
# (eval/audience_eval.py); the user-index source scored 0 there, so it only drives campaign texts.
DEFAULT_WEIGHTS: dict[str, float] = {"repeat": 0.5, "co_purchase": 0.5, "similar_users": 0.0}
CAMPAIGN_WEIGHTS: dict[str, float] = {"co_purchase": 0.5, "similar_users": 0.5}  # not evaluated
# The ``predicted`` source: a dataset's trained encoder over the top POOL users of the fusion with
# POOL_WEIGHTS (every source, so users found only by the user index are scored too); served with
# weights tuned on Taobao's validation days by `shoplens eval audience --encoder` (docs/tasks_results.md).
POOL = 200
POOL_WEIGHTS: dict[str, float] = {"repeat": 0.4, "co_purchase": 0.35, "similar_users": 0.25}
# The grid's best mean NDCG@50 on the validation days 2017-11-29..12-01 (30 items each), with an
# encoder trained on labels before them (docs/results/audience-taobao-*-enc/): click on the view
# audience, purchase on the purchase audience. The purchase encoder got weight 0 there.
PREDICTED_WEIGHTS: dict[str, dict[str, float]] = {
    "click": {"repeat": 4.0, "co_purchase": 0.0, "similar_users": 1.0, "predicted": 1.0},
    "purchase": {"repeat": 0.0, "co_purchase": 1.0, "similar_users": 1.0, "predicted": 0.0},
}
HALF_LIFE_DAYS = 90.0  # a purchase 90 days before the cut-off counts half
COOC_WINDOW = 30  # co-purchase pairs within 30 distinct items of each other


@dataclass
class AudienceIndex:
    """What targeting needs, built from events strictly before `cutoff`.

    Attributes:
        buyers: item id -> {user id: recency-weighted purchase count} (or a count of the
            `build` call's ``event_types``).
        user_activity: user id -> recency-weighted purchase count over all items (cold start).
    """

    catalog: Mapping[str, CatalogItem]
    item_index: VectorIndex
    user_index: VectorIndex
    covisit: CoVisitation
    buyers: dict[str, dict[str, float]]
    user_activity: dict[str, float]
    cutoff: datetime | None

    @classmethod
    def build(cls, events: Iterable[BehaviorEvent], catalog: Mapping[str, CatalogItem], item_index: VectorIndex,
              *, cutoff: datetime | None = None, event_types: Collection[str] = ("purchase",)) -> AudienceIndex:
        """Fit co-visitation, buyers and a user index on events before `cutoff` (all if None).

        `events` must be ordered by (user, time), as `EventStore.iter_events` yields them. The item
        index is content only (titles), so it carries no behaviour from after the cut-off.
        `event_types` are the events that make a user one of an item's "buyers" (purchases by
        default; the audience eval passes e.g. ``("cart",)`` for click-stream data with few
        purchases); co-visitation and the user index use every event either way.
        """
        seqs: dict[str, list[str]] = defaultdict(list)
        buyers: dict[str, dict[str, float]] = defaultdict(dict)
        activity: dict[str, float] = defaultdict(float)
        last_ts = cutoff
        rows = []
        for e in events:
            if cutoff is not None and e.timestamp >= cutoff:
                continue
            rows.append(e)
            if last_ts is None or e.timestamp > last_ts:
                last_ts = e.timestamp
        for e in rows:
            s = seqs[e.user_id]
            if not s or s[-1] != e.item_id:
                s.append(e.item_id)
            if e.event_type in event_types and last_ts is not None:
                w = 0.5 ** ((last_ts - e.timestamp).total_seconds() / 86_400 / HALF_LIFE_DAYS)
                buyers[e.item_id][e.user_id] = buyers[e.item_id].get(e.user_id, 0.0) + w
                activity[e.user_id] += w
        # distinct items per user, co-occurrence within 30 positions: whole-sequence pairs are
        # quadratic in the longest (wholesale) histories of Online Retail
        covisit = CoVisitation(CoVisitationConfig(cooc_window=COOC_WINDOW)).fit(
            list(dict.fromkeys(s)) for s in seqs.values())
        user_index = build_user_index(dict(seqs), item_index)
        return cls(catalog, item_index, user_index, covisit, dict(buyers), dict(activity), cutoff)

    @cached_property
    def title_index(self) -> TitleIndex:
        """The catalog's titles for the verifier, built once per index (not per targeted user)."""
        return TitleIndex(it.title for it in self.catalog.values())

    def title(self, item_id: str) -> str:
        it = self.catalog.get(item_id)
        return it.title if it else f"item {item_id}"


def source_scores(idx: AudienceIndex, item_id: str | None, query: np.ndarray | None = None,
                  *, pool: int = 300) -> dict[str, dict[str, float]]:
    """Raw per-source user scores for a target item (or a campaign query vector)."""
    out: dict[str, dict[str, float]] = {"repeat": {}, "co_purchase": {}, "similar_users": {}}
    seeds: dict[str, float] = {}
    if item_id is not None:
        out["repeat"] = dict(idx.buyers.get(item_id, {}))
        seeds = idx.covisit.score([item_id], top_n=30)
        query = idx.item_index.vector(item_id) if query is None else query
    elif query is not None:  # campaign text: its nearest items seed co-purchase
        seeds = {i: max(0.0, s) for i, s in idx.item_index.search(query[None, :], 10)[0]}
    for other, w in max_scale(seeds).items():
        for u, c in idx.buyers.get(other, {}).items():
            out["co_purchase"][u] = out["co_purchase"].get(u, 0.0) + w * math.log1p(c)
    if query is not None and len(idx.user_index):
        for u, sim in idx.user_index.search(query[None, :], pool)[0]:
            if sim > 0:
                out["similar_users"][u] = sim
    return out


def rank_users(idx: AudienceIndex, item_id: str | None, query: np.ndarray | None = None, *, n: int = 50,
               weights: Mapping[str, float] | None = None,
               extra: Mapping[str, Mapping[str, float]] | None = None) -> list[tuple[str, float, dict[str, float]]]:
    """Top-n (user, fused score in [0, 1], per-source scaled scores), best first.

    Args:
        extra: more sources, name -> {user id: score >= 0} (e.g. ``predicted``, the trained
            encoder's P from `predicted_source`), fused like the built-in ones with `weights`.
    """
    raw = source_scores(idx, item_id, query)
    return fuse_sources(raw | dict(extra or {}), weights or (DEFAULT_WEIGHTS if item_id is not None else CAMPAIGN_WEIGHTS),
                        n=n)


def fuse_sources(raw: Mapping[str, Mapping[str, float]], weights: Mapping[str, float], *, n: int = 50
                 ) -> list[tuple[str, float, dict[str, float]]]:
    """Weighted sum of the max-scaled sources (`source_scores`' shape): top-n (user, fused score
    in [0, 1], per-source scaled scores), best first, ties by user id."""
    w = dict(weights)
    fused: dict[str, float] = defaultdict(float)
    per: dict[str, dict[str, float]] = defaultdict(dict)
    wsum = sum(w.values()) or 1.0
    for src, scores in raw.items():
        if not w.get(src):
            continue
        for u, s in max_scale(scores).items():
            fused[u] += w[src] * s / wsum
            per[u][src] = round(s, 6)
    ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [(u, round(min(1.0, s), 6), per[u]) for u, s in ranked]


def predicted_source(scorer: EncoderScorer, item_id: str, users: Sequence[str],
                     events_of: Callable[[str], Sequence[BehaviorEvent]], as_of: datetime,
                     catalog: Mapping[str, CatalogItem], *, which: str = "blend") -> dict[str, float]:
    """The ``predicted`` audience source: each user's P(click or purchase of `item_id` within the
    encoder's horizon after `as_of`) from a trained encoder (`shoplens train --task click|purchase
    --model bert`), for a candidate pool `users` (the other sources' top users: the encoder is
    ~10 ms a user, so it re-ranks a pool rather than scanning every user).

    Args:
        events_of: a user's events, oldest first (only those before `as_of` are read).
        which: the encoder folder's scorer: ``blend`` (default), ``bert`` or ``baseline``.

    Returns:
        user id -> P in [0, 1], for every user in `users`.
    """
    if not users:
        return {}
    p = scorer.predict_many([(events_of(u), item_id, as_of) for u in users], catalog)[which]
    return {u: float(x) for u, x in zip(users, p, strict=True)}


def predicted_raw(idx: AudienceIndex, item_id: str, scorer: EncoderScorer,
                  events_of: Callable[[str], Sequence[BehaviorEvent]], as_of: datetime, *,
                  pool: int = POOL) -> dict[str, dict[str, float]]:
    """The item's raw sources (`source_scores`) plus ``predicted``: the encoder's P for the top
    `pool` users of the fusion with `POOL_WEIGHTS`. The one pool rule of the served audience and
    of ``eval audience --encoder``."""
    raw = source_scores(idx, item_id)
    users = [u for u, _, _ in fuse_sources(raw, POOL_WEIGHTS, n=pool)]
    return raw | {"predicted": predicted_source(scorer, item_id, users, events_of, as_of, idx.catalog)}


def title_words(title: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", title.lower()) if len(w) > 2 and w not in _STOP}


def category_popularity_baseline(purchases: Iterable[tuple[str, str]], catalog: Mapping[str, CatalogItem],
                                 item_id: str, *, n: int = 50) -> list[str]:
    """Users who bought the most lines of items sharing a title word (or category) with the target.

    Args:
        purchases: (user id, item id) per purchase line, before the cut-off.
    """
    target = catalog.get(item_id)
    if target is None:
        return []
    words = title_words(target.title)
    shared: dict[str, int] = {}  # item id -> title words (+ category) shared with the target
    for i, it in catalog.items():
        k = len(words & title_words(it.title)) + (1 if target.category and it.category == target.category else 0)
        if k:
            shared[i] = k
    counts: dict[str, float] = defaultdict(float)
    for u, i in purchases:
        if i in shared:
            counts[u] += shared[i]
    return [u for u, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def fallback_target_reason(idx: AudienceIndex, item_id: str | None, srcs: Mapping[str, float]) -> str:
    best = max(srcs.items(), key=lambda kv: kv[1], default=("similar_users", 0.0))[0]
    what = idx.title(item_id) if item_id else "this campaign"
    if srcs.get("repeat"):
        return f"[retrieval] Bought {what} before."
    if best == "predicted":
        return f"[retrieval] The fine-tuned encoder ranks this user among the likeliest to respond to {what}."
    if best == "co_purchase":
        return f"[retrieval] Bought items often bought together with {what}."
    return f"[retrieval] Recent purchases look like {what}."


class AudienceService:
    def __init__(self, model: ChatModel | None, *, model_sha256: str | None = None, score_top: int = 3,
                 prob_prompt: str = "audience_score.v1", window: int = 12):
        self.model, self.model_sha256, self.score_top = model, model_sha256, score_top
        self.prob_prompt, self.window = prob_prompt, window

    async def predict(self, idx: AudienceIndex, *, item_id: str | None = None, campaign_text: str | None = None,
                      query: np.ndarray | None = None, n: int = 50, dataset: str | None = None,
                      user_events: Mapping[str, Sequence[BehaviorEvent]] | None = None,
                      weights: Mapping[str, float] | None = None,
                      extra_sources: Mapping[str, Mapping[str, float]] | None = None,
                      notes: Sequence[str] = ()) -> AudiencePrediction:
        """Rank users for an item or a campaign text (`query` = its embedding).

        Args:
            user_events: events of (at least) the top `score_top` users, for the model's reasons.
            weights, extra_sources: `rank_users`' weights and extra (e.g. the ``predicted`` source).
            notes: added to ``meta.notes`` (what ranked the answer).
        """
        t0, trace = time.perf_counter(), CallTrace()
        trace.notes.extend(notes)
        known = item_id is not None and (item_id in idx.buyers or idx.item_index.vector(item_id) is not None)
        ranked = rank_users(idx, item_id, query, n=n, weights=weights, extra=extra_sources) if (known or query is not None) else []
        if not ranked:
            trace.notes.append("cold start: unknown item and no campaign vector; most active buyers shown")
            top = sorted(idx.user_activity.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
            mx = top[0][1] if top else 1.0
            users = [TargetUser(rank=r, user_id=u, score=round(s / mx, 6), source_scores={"activity": round(s / mx, 6)},
                                reason="[cold start] One of the most active recent buyers (no item signal).",
                                reason_source="cold_start") for r, (u, s) in enumerate(top, 1)]
            return AudiencePrediction(dataset=dataset, item_id=item_id, campaign_text=campaign_text, n=n, users=users,
                                      cold_start=True, meta=make_meta("audience", self.model, trace, [], t0, self.model_sha256))
        prompts: list[str] = []
        extra: dict[str, tuple[float | None, str, list[Evidence]]] = {}
        if self.model is not None and self.score_top and user_events:
            tpl = load_prompt(self.prob_prompt)
            prompts.append(tpl.ref)
            target = idx.title(item_id) if item_id else (campaign_text or "")
            for u, _, _ in ranked[: self.score_top]:
                evs = [e for e in user_events.get(u, []) if idx.cutoff is None or e.timestamp < idx.cutoff]
                if not evs:
                    continue
                hist = build_history(u, evs, idx.catalog, window=self.window)
                try:
                    msgs = render(tpl, target=target, ask="probability", **hist.prompt_vars())
                    p = await ask_yes_no(self.model, msgs, trace)
                    schema = AudienceReason.model_json_schema()
                    schema["properties"]["evidence"]["items"] = {"type": "string", "enum": hist.refs}
                    msgs, context = render(tpl, target=target, ask="reason", **hist.prompt_vars()), {"refs": set(hist.refs)}
                    ans = await structured_call(self.model, msgs, AudienceReason, json_schema=schema,
                                                context=context, max_tokens=100, trace=trace)
                    # the reason verified (products, events, numbers), else the labelled retrieval reason
                    checked = await verified_reason(self.model, msgs, ans, hist, idx.catalog, trace,
                                                    titles=[idx.title(item_id)] if item_id else [],
                                                    json_schema=schema, context=context, max_tokens=100,
                                                    catalogue=idx.title_index)
                    extra[u] = (p, checked.reason, evidence_from_refs(hist, checked.evidence)) if checked else (
                        p, "", [])
                except ModelUnavailableError as e:
                    trace.degraded.append(f"model unavailable ({e}); retrieval reasons")
                    break
                except OutputValidationError as e:
                    trace.degraded.append(f"reason for {u} invalid: {e.errors[:1]}")
        elif self.model is None:
            trace.degraded.append("no model configured: retrieval ranking and reasons")
        users = []
        for u, s, srcs in ranked:
            p, reason, ev = extra.get(u, (None, "", []))
            score = 0.5 * s + 0.5 * p if p is not None else s
            users.append(TargetUser(rank=1, user_id=u, score=round(score, 6), source_scores=srcs,
                                    model_probability=None if p is None else round(p, 6),
                                    reason=reason or fallback_target_reason(idx, item_id, srcs),
                                    reason_source="model" if reason else "fallback", evidence=ev))
        head = sorted(users[: self.score_top], key=lambda t: -t.score) if extra else users[: self.score_top]
        users = head + users[self.score_top:]
        for r, t in enumerate(users, 1):
            t.rank = r
        return AudiencePrediction(dataset=dataset, item_id=item_id, campaign_text=campaign_text, n=n, users=users,
                                  meta=make_meta("audience", self.model, trace, prompts, t0, self.model_sha256))
