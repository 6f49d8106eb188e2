"""Next-item prediction: events in, a validated and explained top-k out.

Pipeline (everything before the model call is deterministic):
history view -> fused retrieval candidates -> LLM scores (the letter verbalizer over
permutations, or one pointwise yes/no question per candidate: ``NextItemConfig.llm_scorer``) ->
fusion -> top-k -> explanations: each product's facts (the customer's events it relates to, and
how) written from the retrieval sources (`reason_facts`), plus the model's short "why" per product
and an intent summary from one schema-constrained call -> every model sentence checked by the
verifier (`agent.domain.verify`) -> one repair with the violations fed back -> per sentence, the
labelled template where it is still wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, cast

from agent.data.artifacts import DatasetArtifacts
from agent.data.candidates import Candidate
from agent.domain.history import HistoryView, build_history, event_verb
from agent.domain.predictions import (
    Evidence,
    Explanation,
    Meta,
    ModelStep,
    NextItemPrediction,
    RankedItem,
    explanation_json_schema,
    why_cut_at,
    why_max_chars,
)
from agent.domain.predictions.next_item import WHY_OPENINGS
from agent.domain.schemas import BehaviorEvent
from agent.domain.verify import Facts
from agent.llm.base import ChatModel, Message, ModelUnavailableError, OutputValidationError, Usage
from agent.llm.pointwise import pointwise_scores
from agent.llm.prompting import PromptTemplate, estimate_prompt_tokens, load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.llm.verbalizer import LABELS, verbalizer_scores
from agent.llm.wrappers import Lane, lane
from agent.tasks.verified import Sentences, verify_answer

LlmScorer = Literal["verbalizer", "pointwise"]


@dataclass
class NextItemConfig:
    k: int = 5
    n_candidates: int = 20  # LLMRank / LlamaRec rank 20
    permutations: int = 2  # verbalizer: forward + reverse order cancels first/last position bias
    # "verbalizer": letter labels, one call per permutation (LlamaRec); "pointwise": one yes/no
    # call per candidate over a shared history prefix, position-free (agent/llm/pointwise.py)
    llm_scorer: LlmScorer = "verbalizer"
    # final = w * llm + (1 - w) * retrieval fusion. None: the dataset's served weight
    # (`DatasetArtifacts.llm_weight`: fitted by `shoplens train --llm`, else 0). At 0 the model
    # does not rank (no scoring call); it still explains.
    llm_weight: float | None = None
    use_llm_ranking: bool = True
    explain: bool = True
    repurchase: bool = False
    max_attempts: int = 2  # explanation: one call + one repair
    window: int = 20  # events shown to the model
    rank_prompt: str = "next_item_rank.v1"
    pointwise_prompt: str = "next_item_pointwise.v1"
    # v3: facts from templates, the model's "why" per product and the summary, each verified
    # (v2, the model's whole reason with its own event refs, named wrong products and events;
    # v2 shared the ranking prompt's prefix: 34 s vs v1's 63 s, docs/bench.md section 7)
    explain_prompt: str = "next_item_explain.v3"
    explain_max_words: int = 12  # a "why"'s asked length (the schema caps it at `why_max_chars`)
    summary_max_chars: int = 240
    explain_lane: Lane | None = None  # the explanation call's model lane; None: the caller's
    # The most prompt tokens one model call may take (estimated before sending, upper bound; see
    # agent.llm.prompting.estimate_tokens): the history shown is cut, oldest events first, until
    # the ranking and explanation prompts fit. 1536 leaves Online Retail's prompts whole (real
    # counts 1,020 mean / 1,230 max on 60 customers) and bounds long-title shops. None: no budget.
    prompt_budget_tokens: int | None = 1536
    source_weights: dict[str, float] | None = None
    seed: int = 0

    @property
    def scorer_prompt(self) -> str:
        """The prompt reference of the configured LLM scorer (`llm_scorer`)."""
        return self.pointwise_prompt if self.llm_scorer == "pointwise" else self.rank_prompt

    def weight_for(self, served: float) -> float:
        """The model weight this configuration ranks with: its own `llm_weight`, else `served`
        (the dataset's, `DatasetArtifacts.llm_weight`)."""
        return self.llm_weight if self.llm_weight is not None else served


class NextItemService:
    """Runs the next-item pipeline against one `ChatModel` (or none: retrieval only).

    Args:
        model: the model seam; None answers from retrieval fusion with `meta.degraded`.
        model_sha256: recorded in every answer's meta (the GGUF's hash for the embedded model).
    """

    def __init__(self, model: ChatModel | None, *, model_sha256: str | None = None):
        self.model = model
        self.model_sha256 = model_sha256

    async def predict(
        self,
        user_id: str,
        events: Sequence[BehaviorEvent],
        artifacts: DatasetArtifacts,
        config: NextItemConfig | None = None,
        *,
        as_of: datetime | None = None,
        candidates: Sequence[str] | None = None,
        on_ranked: Callable[[NextItemPrediction], Awaitable[None]] | None = None,
    ) -> NextItemPrediction:
        """Predict the user's next k items.

        Args:
            events: the user's events, oldest first (validated `BehaviorEvent`s).
            artifacts: the dataset's catalogue and retrieval indexes.
            as_of: reference time for relative times in the prompt (default: last event).
            candidates: rank exactly these catalogue item ids (a recommender's own candidate
                set, or an evaluation protocol's) instead of retrieving candidates; the same
                sources score them, the same LLM scorer and fusion rank them. None: retrieve.
            on_ranked: awaited with the final ranking (template reasons) before the explanation
                call, when one follows: a progressive answer shows it while the reasons come.

        Returns:
            A `NextItemPrediction` with exactly k distinct candidate items (fewer only when fewer
            candidates exist, noted in `meta.notes`).
        """
        cfg = config or NextItemConfig()
        t0 = time.perf_counter()
        trace = CallTrace()
        hist = build_history(user_id, events, artifacts.catalog, window=cfg.window, as_of=as_of)
        item_seq = [e.item_id for e in events]
        generator = artifacts.generator(cfg.source_weights)
        if cfg.source_weights is None:
            trace.notes.append(artifacts.fusion_note or "fusion: default source weights (set by hand "
                               "on Online Retail; `shoplens train` fits them to this dataset)")
        if candidates is not None:
            cands = generator.score(item_seq, candidates, user_id=user_id)
        else:
            exclude = set() if cfg.repurchase else set(hist.purchased_items)
            # only catalogue items are recommended: events may name items the catalogue lacks
            # (POST /v1/events accepts any id), and `recent` and co-visitation would return them
            unknown = {i for i in item_seq if i not in artifacts.catalog}
            cands = generator.generate(item_seq, n=cfg.n_candidates, user_id=user_id, exclude=exclude | unknown)
            if unknown:
                trace.notes.append(f"{len(unknown)} item(s) of this history are not in the catalogue and are "
                                   "never recommended")
        cold = not events
        weight = cfg.weight_for(artifacts.llm_weight)
        if cfg.use_llm_ranking and self.model is not None and not cold:
            if cfg.llm_weight is None:
                trace.notes.append(artifacts.llm_weight_note or untrained_note(artifacts.dataset))
            elif weight > 0:
                trace.notes.append(f"model ranking weight {weight:g}, set by configuration")
            else:
                trace.notes.append("model ranking off: weight 0 set by configuration")
        # from here on the configuration as applied: at weight 0 the model does not rank at all
        cfg = replace(cfg, use_llm_ranking=cfg.use_llm_ranking and weight > 0, llm_weight=weight)
        # the model scores the best n_candidates by fusion (all of them unless a caller sent more)
        head, tail = cands[: cfg.n_candidates], cands[cfg.n_candidates:]
        prompts: list[str] = []
        estimates: dict[str, int] = {}
        if self.model is not None and not cold and (cfg.use_llm_ranking or cfg.explain):
            hist, estimates = self._fit_budget(user_id, events, artifacts, cfg, as_of, head, hist, trace)
        if len(cands) < cfg.k:
            trace.notes.append(f"only {len(cands)} candidates exist for k={cfg.k}")

        # --- LLM verbalizer scores, fused with retrieval --------------------------------
        llm_scores: dict[str, float] = {}
        if cfg.use_llm_ranking and not cold and len(cands) > 1:
            if self.model is None:
                trace.degraded.append("no model configured: ranked by retrieval fusion only")
            else:
                titles = {c.item_id: artifacts.title(c.item_id) for c in head}
                try:
                    if cfg.llm_scorer == "pointwise":
                        tpl = load_prompt(cfg.pointwise_prompt)
                        prompts.append(tpl.ref)
                        pw = await pointwise_scores(self.model, tpl, {**hist.prompt_vars(), "verb": "buy"},
                                                    [c.item_id for c in head], titles)
                        llm_scores = pw.p_yes
                        calls, usage, latency = pw.calls, pw.usage, pw.model_latency_s
                        if pw.answered < 0.5:
                            trace.notes.append(f"model answered yes/no for only {pw.answered:.0%} of candidates")
                    else:
                        tpl = load_prompt(cfg.rank_prompt)
                        prompts.append(tpl.ref)
                        res = await verbalizer_scores(
                            self.model, tpl, hist.prompt_vars(), [c.item_id for c in head][: len(LABELS)],
                            titles, permutations=cfg.permutations, seed=cfg.seed,
                        )
                        llm_scores = res.scores
                        calls, usage, latency = res.calls, res.usage, res.model_latency_s
                        if res.label_mass < 0.5:
                            trace.notes.append(f"model put only {res.label_mass:.0%} probability on labels")
                    trace.usage.add(usage)
                    trace.attempts += calls
                    trace.model_latency_s += latency
                    trace.steps.append(_step("rank", calls, usage, estimates.get("rank", 0), cfg))
                except ModelUnavailableError as e:
                    trace.degraded.append(f"model unavailable for ranking ({e}); retrieval fusion only")
        ranked = blend(head, llm_scores, weight, artifacts.review_penalties)
        if tail:  # a caller's candidates beyond the model's n_candidates: after the head, by fusion
            floor = min((sc for _, sc in ranked), default=1.0)
            ranked += [(c, round(sc * floor, 6)) for c, sc in blend(tail, {}, 0.0, artifacts.review_penalties)]
        ranked = ranked[: cfg.k]

        # --- explanations ---------------------------------------------------------------
        reasons: dict[str, tuple[str, list[str]]] = {}
        summary = ""
        summary_source: Literal["model", "fallback"] = "fallback"

        def assemble() -> NextItemPrediction:
            return self._assemble(user_id, hist, ranked, llm_scores, reasons, summary, summary_source,
                                  artifacts, cfg, cold, trace, prompts, t0)

        if cfg.explain and ranked and not cold and self.model is not None:
            if on_ranked is not None:  # the ranking is final here; reasons come next
                await on_ranked(assemble())
            tpl = load_prompt(cfg.explain_prompt)
            prompts.append(tpl.ref)
            # each ranked item's facts and cited refs, once: the prompt shows them, the verifier
            # checks against them, the answer carries them
            facts = [reason_facts(c, hist, artifacts) for c, _ in ranked]
            messages = self._explain_messages(tpl, hist, [(artifacts.title(c.item_id), f) for (c, _), (f, _) in
                                                          zip(ranked, facts, strict=True)], cfg.explain_max_words)
            before = Usage(trace.usage.prompt_tokens, trace.usage.completion_tokens, trace.usage.cached_tokens)
            attempts_before = trace.attempts
            try:
                with lane(cfg.explain_lane) if cfg.explain_lane else nullcontext():
                    try:
                        expl = await self._explain(messages, hist, len(ranked), cfg, trace)
                    finally:
                        spent = Usage(trace.usage.prompt_tokens - before.prompt_tokens,
                                      trace.usage.completion_tokens - before.completion_tokens,
                                      trace.usage.cached_tokens - before.cached_tokens)
                        trace.steps.append(_step("explain", trace.attempts - attempts_before, spent,
                                                 estimate_prompt_tokens(messages), cfg))
                labels = LABELS[: len(ranked)]
                checked = await verify_answer(
                    self.model, messages, expl, lambda x: self._sentences(x, hist, ranked, facts, artifacts,
                                                                          cfg.explain_max_words, cfg.summary_max_chars),
                    artifacts.title_index, trace, json_schema=self._explain_schema(len(ranked), cfg),
                    context={"labels": labels}, max_tokens=self._explain_max_tokens(len(ranked), cfg))
                for lab, (cand, _), (fact, refs) in zip(labels, ranked, facts, strict=True):
                    ans = checked.pick.get(lab)
                    if ans is not None:
                        why = next(x for x in ans.reasons if x.item == lab).why
                        reasons[cand.item_id] = (f"{fact} {sentence(why)}", refs)
                picked = checked.pick.get("summary")
                if picked is not None:
                    summary, summary_source = picked.intent_summary, "model"
            except ModelUnavailableError as e:
                trace.degraded.append(f"model unavailable for explanations ({e})")
            except OutputValidationError as e:
                trace.degraded.append(f"explanation invalid after {e.attempts} attempts: {e.errors[:2]}")
        elif cfg.explain and self.model is None and not cold and not trace.degraded:
            trace.degraded.append("no model configured: generic retrieval reasons")
        return assemble()

    def _assemble(
        self, user_id: str, hist: HistoryView, ranked: list[tuple[Candidate, float]],
        llm_scores: dict[str, float], reasons: dict[str, tuple[str, list[str]]], summary: str,
        summary_source: Literal["model", "fallback"], artifacts: DatasetArtifacts, cfg: NextItemConfig,
        cold: bool, trace: CallTrace, prompts: list[str], t0: float,
    ) -> NextItemPrediction:
        """The validated answer from the ranking and whatever reasons the model gave so far (the
        others get the retrieval template, labelled `reason_source="fallback"`)."""
        items = []
        for rank, (cand, score) in enumerate(ranked, start=1):
            src = dict(cand.source_scores)
            if cand.item_id in llm_scores:
                src["llm"] = round(llm_scores[cand.item_id], 6)
            if cand.item_id in reasons:
                text, refs = reasons[cand.item_id]
                text += review_note(cand.item_id, artifacts.review_penalties)
                ev = [_evidence(hist, r) for r in refs]
                items.append(RankedItem(rank=rank, item_id=cand.item_id, title=artifacts.title(cand.item_id),
                                        score=score, source_scores=src, reason=text, reason_source="model",
                                        evidence=[x for x in ev if x]))
            else:
                text, refs = fallback_reason(cand, hist, artifacts, cold)
                text += review_note(cand.item_id, artifacts.review_penalties)
                items.append(RankedItem(rank=rank, item_id=cand.item_id, title=artifacts.title(cand.item_id),
                                        score=score, source_scores=src, reason=text, reason_source="fallback",
                                        evidence=[x for x in (_evidence(hist, r) for r in refs) if x]))
        if summary_source == "fallback":
            summary = fallback_summary(hist, cold)
        meta = Meta(
            task="next_item",
            prompt_versions=list(prompts),
            model_id=getattr(self.model, "model_id", None),
            model_sha256=self.model_sha256,
            attempts=trace.attempts,
            salvaged=trace.salvaged,
            prompt_tokens=trace.usage.prompt_tokens,
            completion_tokens=trace.usage.completion_tokens,
            latency_s=round(time.perf_counter() - t0, 4),
            model_latency_s=round(trace.model_latency_s, 4),
            degraded=bool(trace.degraded),
            degraded_reason="; ".join(trace.degraded) or None,
            notes=trace.notes + (["cold start: no history, popularity ranking"] if cold else []),
            steps=list(trace.steps),
            verification=trace.verification,
        )
        return NextItemPrediction(
            user_id=user_id, dataset=artifacts.dataset, k=cfg.k, items=items, intent_summary=summary,
            summary_source=summary_source, cold_start=cold, meta=meta,
        )

    async def _explain(
        self, messages: list[Message], hist: HistoryView, n_items: int, cfg: NextItemConfig, trace: CallTrace,
    ) -> Explanation:
        """One constrained call with the rendered explanation prompt (`_explain_messages`, for
        `n_items` ranked items), then up to `max_attempts - 1` repairs with the errors fed back.

        Raises:
            OutputValidationError: still invalid after the last attempt.
            ModelUnavailableError: from the model.
        """
        assert self.model is not None
        return await structured_call(
            self.model, messages, Explanation, json_schema=self._explain_schema(n_items, cfg),
            context={"labels": LABELS[:n_items]}, max_attempts=cfg.max_attempts,
            max_tokens=self._explain_max_tokens(n_items, cfg), trace=trace,
        )

    @staticmethod
    def _explain_schema(n_items: int, cfg: NextItemConfig) -> dict[str, object]:
        return explanation_json_schema(LABELS[:n_items], max_words=cfg.explain_max_words,
                                       summary_max_chars=cfg.summary_max_chars)

    @staticmethod
    def _explain_max_tokens(n_items: int, cfg: NextItemConfig) -> int:
        """The explanation call's cap: room for each "why" at its schema cap (~3 characters a
        token) with its JSON, and the summary at its cap, so the grammar's string caps, not the
        token limit, end a long answer (a reply cut by the token limit is invalid JSON)."""
        return (why_max_chars(cfg.explain_max_words) // 3 + 16) * n_items + cfg.summary_max_chars // 3 + 40

    @staticmethod
    def _sentences(expl: Explanation, hist: HistoryView, ranked: Sequence[tuple[Candidate, float]],
                   facts: Sequence[tuple[str, list[str]]], artifacts: DatasetArtifacts, max_words: int,
                   summary_max_chars: int) -> Sentences:
        """The model-written sentences of `expl` with what each may say (`Facts`): a product's
        "why" may name that product and the items of its cited events, use their numbers, claim
        first place only for rank 1 and popularity only where the popularity or similar-user
        source scored it; the summary may name any ranked or shown item, and a ranking claim in
        it must name the top item first. `facts`: each ranked item's (`reason_facts`)."""
        out: dict[str, tuple[str, Facts]] = {}
        for rank, (lab, (cand, _), (fact, refs)) in enumerate(zip(LABELS, ranked, facts, strict=False), start=1):
            why = next((x.why for x in expl.reasons if x.item == lab), None)
            if why is None:
                continue
            lines = [x for r in refs if (x := hist.resolve(r)) is not None]
            out[lab] = (why, why_facts(artifacts.title(cand.item_id), rank, cand.source_scores,
                                       [(x.ref, artifacts.title(x.event.item_id), x.text) for x in lines],
                                       max_chars=why_cut_at(max_words), echo=[fact]))
        titles = [artifacts.title(c.item_id) for c, _ in ranked]
        out["summary"] = (expl.intent_summary, Facts(
            titles=titles + [artifacts.title(x.event.item_id) for x in hist.lines], refs=hist.refs,
            numbers=[x.text for x in hist.lines] + [x.when for x in hist.lines]
            + [str(v) for v in hist.profile.values() if isinstance(v, (int, float, str))],
            may_rank_first=True, top_title=titles[0] if titles else None, ranked=titles,
            max_chars=summary_max_chars))
        return out

    @staticmethod
    def _explain_messages(tpl: PromptTemplate, hist: HistoryView, ranked: Sequence[tuple[str, str]],
                          max_words: int) -> list[Message]:
        """The explanation prompt for the ranked items, (title, facts) each in rank order (labels A..)."""
        items = [{"label": lab, "title": title, "fact": fact}
                 for lab, (title, fact) in zip(LABELS, ranked, strict=False)]
        return render(tpl, items=items, max_words=max_words, openings=WHY_OPENINGS, **hist.prompt_vars())

    def _prompt_estimates(self, hist: HistoryView, head: Sequence[Candidate], artifacts: DatasetArtifacts,
                          cfg: NextItemConfig) -> dict[str, int]:
        """Upper-bound prompt-token estimates of the calls this answer will make with `hist`:
        ``rank`` (the verbalizer's prompt with every head candidate, or the pointwise prompt with
        the longest title) and ``explain`` (the top k by retrieval, standing in for the final
        ranking, whose titles are not known yet)."""
        out: dict[str, int] = {}
        if cfg.use_llm_ranking and len(head) > 1:
            titles = [artifacts.title(c.item_id) for c in head]
            if cfg.llm_scorer == "pointwise":
                msgs = render(load_prompt(cfg.pointwise_prompt), **hist.prompt_vars(), verb="buy",
                              candidate=max(titles, key=len))
            else:
                msgs = render(load_prompt(cfg.rank_prompt), **hist.prompt_vars(), verb="buy",
                              candidates=[{"label": lab, "title": t} for lab, t in zip(LABELS, titles, strict=False)])
            out["rank"] = estimate_prompt_tokens(msgs)
        if cfg.explain and head:
            out["explain"] = estimate_prompt_tokens(self._explain_messages(
                load_prompt(cfg.explain_prompt), hist,
                [(artifacts.title(c.item_id), reason_facts(c, hist, artifacts)[0]) for c in head[: cfg.k]],
                cfg.explain_max_words))
        return out

    def _fit_budget(self, user_id: str, events: Sequence[BehaviorEvent], artifacts: DatasetArtifacts,
                    cfg: NextItemConfig, as_of: datetime | None, head: Sequence[Candidate],
                    hist: HistoryView, trace: CallTrace) -> tuple[HistoryView, dict[str, int]]:
        """The longest history window (at most ``cfg.window`` events, newest kept) whose prompts
        fit ``cfg.prompt_budget_tokens``, by binary search (the estimate grows with the window),
        and the estimates at that window. A cut is said in ``meta.notes``; a prompt that does
        not fit even with one event is sent as it is, noted."""
        est = self._prompt_estimates(hist, head, artifacts, cfg)
        budget = cfg.prompt_budget_tokens
        if budget is None or max(est.values(), default=0) <= budget:
            return hist, est
        lo, hi, best = 1, max(1, min(cfg.window, len(events)) - 1), None
        while lo <= hi:
            mid = (lo + hi) // 2
            h = build_history(user_id, events, artifacts.catalog, window=mid, as_of=as_of)
            e = self._prompt_estimates(h, head, artifacts, cfg)
            if max(e.values(), default=0) <= budget:
                best, lo = (h, e), mid + 1
            else:
                hi = mid - 1
        if best is None:
            trace.notes.append(f"prompt over budget: ~{max(est.values())} tokens estimated with the full "
                               f"history, {budget} allowed, and it does not fit with one event either")
            return hist, est
        trace.notes.append(f"history cut to {len(best[0].lines)} of {len(hist.lines)} events to fit the "
                           f"{budget}-token prompt budget (~{max(est.values())} tokens estimated with all)")
        return best


def _step(name: str, calls: int, usage: Usage, estimate: int, cfg: NextItemConfig) -> ModelStep:
    """One `ModelStep` for ``meta.steps``."""
    return ModelStep(step=name, calls=calls, prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                     completion_tokens=usage.completion_tokens, prompt_estimate=estimate,
                     prompt_budget=cfg.prompt_budget_tokens)


def untrained_note(dataset: str) -> str:
    """The `meta.notes` line of a dataset no model weight was fitted for (`agent.tasks.llm_weight`)."""
    return (f"model ranking off (weight 0): no model weight was fitted for {dataset!r}; "
            f"`shoplens train --dataset {dataset} --llm` measures one on validation users")


def blend(
    cands: list[Candidate], llm: dict[str, float], w: float,
    penalties: dict[str, dict[str, float]] | None = None,
) -> list[tuple[Candidate, float]]:
    """Final score in [0, 1]: w * llm (scaled by its max) + (1 - w) * retrieval fusion (scaled
    by its max; min-max when learned weights make some fused scores negative), times
    (1 - penalty) for items whose recent reviews are mostly negative."""
    fused = [c.fused for c in cands]
    lo, hi = min(fused, default=0.0), max(fused, default=0.0)
    if lo >= 0:
        lo, hi = 0.0, hi or 1.0
    span = (hi - lo) or 1.0
    top_l = max(llm.values(), default=0.0) or 1.0
    penalties = penalties or {}
    out = []
    for c in cands:
        f = (c.fused - lo) / span
        s = w * (llm.get(c.item_id, 0.0) / top_l) + (1 - w) * f if llm else f
        if c.item_id in penalties:
            s *= 1.0 - penalties[c.item_id]["penalty"]
        out.append((c, round(min(1.0, max(0.0, s)), 6)))
    return sorted(out, key=lambda x: (-x[1], x[0].item_id))


def review_note(item_id: str, penalties: dict[str, dict[str, float]]) -> str:
    """' Down-ranked: 4 of 6 recent reviews are negative.' or '' (said in every reason)."""
    d = penalties.get(item_id)
    if not d:
        return ""
    return f" Down-ranked: {int(d['negative'])} of {int(d['n'])} recent reviews are negative."


def _evidence(hist: HistoryView, ref: str) -> Evidence | None:
    line = hist.resolve(ref)
    if line is None:
        return None
    e = line.event
    return Evidence(ref=ref, event_id=e.event_id, item_id=e.item_id, event_type=e.event_type,
                    timestamp=e.timestamp.isoformat(), summary=line.text)


def _own_ref(cand: Candidate, hist: HistoryView) -> str | None:
    """The candidate's own latest shown event when the `recent` source scored it (the user
    touched the item itself: that, not a neighbour, is what explains it), else None."""
    if cand.source_scores.get("recent", 0.0) <= 0:
        return None
    return next((x.ref for x in reversed(hist.lines) if x.event.item_id == cand.item_id), None)


def _anchor(cand: Candidate, hist: HistoryView, artifacts: DatasetArtifacts) -> str | None:
    """The shown event whose item best explains the candidate: its own latest event when the
    user touched it (`_own_ref`), else by co-visitation, then similarity."""
    own = _own_ref(cand, hist)
    if own is not None:
        return own
    best_ref, best = None, 0.0
    cv = artifacts.covisit
    cvec = artifacts.item_index.vector(cand.item_id)
    for line in reversed(hist.lines):
        s = cv.score([line.event.item_id], [cand.item_id]).get(cand.item_id, 0.0)
        v = artifacts.item_index.vector(line.event.item_id)
        if cvec is not None and v is not None:
            s += 0.1 * float(cvec @ v)
        if s > best:
            best_ref, best = line.ref, s
    return best_ref


def reason_facts(cand: Candidate, hist: HistoryView, artifacts: DatasetArtifacts) -> tuple[str, list[str]]:
    """The facts behind a recommended item, in one sentence written from the retrieval sources
    (never by the model), and the event references it cites: the customer's own event with the
    item, else the event whose item anchors it (`_anchor`: co-visitation, then similarity),
    e.g. ``("Customers who bought HAND WARMER UNION JACK (E20) often bought this too.", ["E20"])``.
    Co-occurrence counts every event type, so the anchor's own verb is used ("viewed"), never
    "bought" for a view. Not for a cold-start user (no events: see `fallback_reason`)."""
    ref = _anchor(cand, hist, artifacts)
    line = hist.resolve(ref) if ref else None
    src = max(cand.source_scores.items(), key=lambda kv: kv[1], default=("popularity", 0))[0]
    anchor = artifacts.title(line.event.item_id) if line else None
    if line is not None and line.event.item_id == cand.item_id:  # the user touched it (_own_ref)
        text = f"Recently {event_verb(line.event.event_type)} by this customer ({ref})."
    elif src == "covisit" and anchor and line is not None:
        text = (f"Customers who {event_verb(line.event.event_type)} {anchor} ({ref}) often "
                f"{'bought' if line.event.event_type == 'purchase' else 'chose'} this too.")
    elif src == "embedding" and anchor:
        text = f"Similar to {anchor} ({ref}) in this customer's history."
    elif src == "similar_users":
        text = "Popular with customers whose histories resemble this one" + (
            f"; related to {anchor} ({ref})." if anchor else ".")
    else:
        text = "A best-seller in this shop" + (f"; related to {anchor} ({ref})." if anchor else ".")
    return text, [ref] if ref else []


def why_facts(title: str, rank: int, source_scores: Mapping[str, float], cited: Sequence[tuple[str, str, str]],
              *, max_chars: int | None = None, echo: Sequence[str] = ()) -> Facts:
    """What a ranked item's reason may say (`agent.domain.verify.Facts`): its own title and its
    cited events' (`cited`: (ref, item title, event line) each, from `reason_facts`), those refs,
    those events' numbers; that the customer bought (viewed, ...) only its cited events' items;
    first place only at rank 1; "popular" only where the popularity or
    similar-user source scored it; with `max_chars` (the grammar's cut) and `echo` (the facts
    it follows) for the model's own "why". From the answer alone (`RankedItem` has all of it),
    so `shoplens eval faithfulness` rebuilds the same facts to seed wrong sentences."""
    return Facts(titles=[title, *(t for _, t, _ in cited)], refs=[r for r, _, _ in cited],
                 max_chars=max_chars, echo=echo,
                 numbers=[line for _, _, line in cited], may_rank_first=rank == 1,
                 event_titles=[t for _, t, _ in cited],
                 popular=any(source_scores.get(s, 0.0) > 0 for s in ("popularity", "similar_users")))


def fallback_reason(cand: Candidate, hist: HistoryView, artifacts: DatasetArtifacts, cold: bool) -> tuple[str, list[str]]:
    """The template reason, labelled ``[retrieval fallback]``: the item's facts (`reason_facts`)
    alone, shown where the model gave no reason or its reason failed the verifier twice."""
    if cold:
        return "[retrieval fallback] A best-seller; this customer has no history yet (cold start).", []
    text, refs = reason_facts(cand, hist, artifacts)
    return "[retrieval fallback] " + text, refs


def sentence(clause: str) -> str:
    """A model's clause as a sentence: trimmed, first letter capitalised, one full stop
    ("a matching winter warmer" -> "A matching winter warmer.")."""
    c = " ".join(clause.split()).rstrip(" ,;:")
    if not c:
        return ""
    c = c[0].upper() + c[1:]
    return c if c[-1] in ".!?。！？" else c + "."


def fallback_summary(hist: HistoryView, cold: bool) -> str:
    if cold:
        return "[retrieval fallback] No history for this customer: showing best-sellers (cold start)."
    # build_history stores `themes(...)`, a list[str], under "top_themes"; the profile dict is
    # typed dict[str, object] because its values vary by key.
    themes = cast("list[str]", hist.profile.get("top_themes") or [])
    return ("[retrieval fallback] " + f"{hist.profile['n_events']} events, {hist.profile['span']}"
            + (f"; frequent themes: {', '.join(themes)}." if themes else "."))


def prediction_json(p: NextItemPrediction) -> str:
    return json.dumps(p.model_dump(mode="json"), ensure_ascii=False, indent=2)
