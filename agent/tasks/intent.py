"""Purchase intent: P(user buys the item within a stated horizon), with funnel evidence cited.

Funnel features (views, carts, favourites, purchases, dwell proxy, recency) are computed in
code (`funnel_features`) from events strictly before the as-of time. The probability is a
logistic-regression baseline on those features, blended in logit space with the model's
verbalizer probability (the yes/no answer token's probability, not a written number). A second,
schema-constrained call names the funnel stage and writes a reason citing event references.

The shared task kit (evidence, meta, probabilities, baseline, blend) is `agent.tasks.common`;
the schemas (`IntentAnswer`, `IntentPrediction`, `Stage`) are `agent.domain.predictions.intent`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from agent.domain.history import HistoryView, build_history
from agent.domain.predictions import IntentAnswer, IntentPrediction, IntentScorer, Stage
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import ChatModel
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.tasks.common import (
    Blend,
    LogisticBaseline,
    ask_or_degrade,
    ask_yes_no,
    evidence_from_refs,
    make_meta,
)
from agent.tasks.verified import verified_reason

if TYPE_CHECKING:
    from agent.tasks.encoder_train import EncoderScorer

Scorer = IntentScorer

# ---- funnel features -------------------------------------------------------------------------

INTENT_FEATURES = ["log_views", "log_carts", "log_favs", "bought_before", "log_hours_since_last",
                   "log_dwell_min", "log_user_purchases", "user_buy_rate", "log_category_events"]
DWELL_CAP_MIN = 30.0  # a gap longer than this after a view is not dwell


@dataclass
class Funnel:
    n_views: int  # views and clicks of this item before as_of
    n_carts: int
    n_favs: int
    n_removes: int
    n_purchases: int
    hours_since_last: float | None  # since the last event on this item
    hours_since_first: float | None
    dwell_min: float  # sum of gaps after events on this item, each capped at 30 min
    user_events: int
    user_purchases: int
    user_buy_rate: float  # distinct items bought / distinct items touched
    category_events: int  # the user's events in this item's category

    def vector(self) -> dict[str, float]:
        return {
            "log_views": math.log1p(self.n_views), "log_carts": math.log1p(self.n_carts),
            "log_favs": math.log1p(self.n_favs), "bought_before": float(self.n_purchases > 0),
            "log_hours_since_last": math.log1p(self.hours_since_last if self.hours_since_last is not None else 24 * 30),
            "log_dwell_min": math.log1p(self.dwell_min), "log_user_purchases": math.log1p(self.user_purchases),
            "user_buy_rate": self.user_buy_rate, "log_category_events": math.log1p(self.category_events),
        }


def funnel_features(events: Sequence[BehaviorEvent], item_id: str, as_of: datetime,
                    catalog: Mapping[str, CatalogItem] | None = None) -> Funnel:
    """Funnel counts for (user, item) from the user's events strictly before `as_of` (oldest first)."""
    evs = [e for e in events if e.timestamp < as_of]
    mine = [e for e in evs if e.item_id == item_id]
    n = {t: sum(e.event_type == t for e in mine) for t in ("view", "click", "cart", "favourite", "remove_from_cart", "purchase")}
    dwell = 0.0
    for a, b in zip(evs, evs[1:], strict=False):
        if a.item_id == item_id:
            dwell += min(DWELL_CAP_MIN, (b.timestamp - a.timestamp).total_seconds() / 60)
    touched = {e.item_id for e in evs}
    bought = {e.item_id for e in evs if e.event_type == "purchase"}
    cat = (catalog or {}).get(item_id)
    cat_events = 0
    if cat is not None and cat.category:
        cat_events = sum(1 for e in evs if (c := (catalog or {}).get(e.item_id)) and c.category == cat.category)

    def hrs(t: datetime) -> float:
        return round((as_of - t).total_seconds() / 3600, 3)

    return Funnel(
        n_views=n["view"] + n["click"], n_carts=n["cart"], n_favs=n["favourite"], n_removes=n["remove_from_cart"],
        n_purchases=n["purchase"], hours_since_last=hrs(mine[-1].timestamp) if mine else None,
        hours_since_first=hrs(mine[0].timestamp) if mine else None, dwell_min=round(dwell, 3),
        user_events=len(evs), user_purchases=sum(e.event_type == "purchase" for e in evs),
        user_buy_rate=round(len(bought) / len(touched), 4) if touched else 0.0, category_events=cat_events,
    )


@dataclass
class AskedModel:
    """What the model said for an intent-style task: P(yes) (None: no usable answer), the
    explanation (stage, reason, cited refs; source "model", or "fallback" when absent), and the
    prompt refs used."""

    p_model: float | None = None
    stage: Stage | None = None
    reason: str = ""
    refs: list[str] = field(default_factory=list)
    source: Literal["model", "fallback"] = "fallback"
    prompts: list[str] = field(default_factory=list)


async def ask_intent_model(model: ChatModel | None, prob_prompt: str, explain_prompt: str | None,
                           variables: dict[str, Any], hist: HistoryView, trace: CallTrace, *,
                           catalog: Mapping[str, CatalogItem], probability: Callable[[float | None], float],
                           titles: Sequence[str] = (), ask_probability: bool = True,
                           served_by: str = "baseline") -> AskedModel:
    """The model side of purchase intent (per item and per session): one yes/no verbalizer call,
    then (when `explain_prompt` is given) one schema-constrained explanation whose evidence must
    be refs of `hist`, its reason verified (`verified_reason`: the products it names are its
    cited events' items or `titles`, its numbers are the prompt's, and its intent words agree
    with ``probability(p_model)``, the served probability, on the side of 0.5). Failures are
    recorded in ``trace.degraded``; nothing is raised, the caller falls back to the baseline
    probability and a template reason. Without `ask_probability` only the explanation is asked
    (the served probability does not use the model's); `served_by` names who then gives the
    probability in the degraded note."""
    out = AskedModel()

    async def step(m: ChatModel) -> None:
        if ask_probability:
            tpl = load_prompt(prob_prompt)
            out.prompts.append(tpl.ref)
            out.p_model = await ask_yes_no(m, render(tpl, **variables), trace)
        if explain_prompt:
            etpl = load_prompt(explain_prompt)
            out.prompts.append(etpl.ref)
            schema = IntentAnswer.model_json_schema()
            schema["properties"]["evidence"]["items"] = {"type": "string", "enum": hist.refs}
            messages, context = render(etpl, **variables), {"refs": set(hist.refs)}
            first = await structured_call(m, messages, IntentAnswer, json_schema=schema, context=context,
                                          max_tokens=160, trace=trace)
            ans = await verified_reason(m, messages, first, hist, catalog, trace, titles=titles,
                                        direction="high" if probability(out.p_model) >= 0.5 else "low",
                                        json_schema=schema, context=context)
            if ans is not None:
                out.stage, out.reason, out.refs, out.source = ans.stage, ans.reason, ans.evidence, "model"

    await ask_or_degrade(model, step, trace, what="intent answer",
                         fallback=f"{served_by} probability, template reason")
    return out


def answer_fields(baseline: LogisticBaseline, p_base: float, asked: AskedModel, hist: HistoryView,
                  fallback: Callable[[], tuple[str, list[str]]], served: tuple[float, str] | None = None
                  ) -> dict[str, Any]:
    """The answer part shared by the intent predictions (`IntentFields`, less the envelope): the
    served probability and its source (`served`, else the baseline blended with the model), the
    inputs, and the stage/reason/evidence from the model, or from `fallback()` (a truthful
    template reason and its refs) when the model gave none."""
    reason, refs = (asked.reason, asked.refs) if asked.source == "model" else fallback()
    p_model = asked.p_model
    p, source = served or ((baseline.blend or Blend())(p_base, p_model), "blend" if p_model is not None else "baseline")
    return dict(probability=round(p, 6), probability_source=source,
                baseline_probability=round(p_base, 6), model_probability=None if p_model is None else round(p_model, 6),
                stage=asked.stage, reason=reason, reason_source=asked.source, evidence=evidence_from_refs(hist, refs))


def _intent_history(user_id: str, evs: Sequence[BehaviorEvent], item_id: str,
                    catalog: Mapping[str, CatalogItem], as_of: datetime, window: int) -> HistoryView:
    """The item's last events plus the user's most recent ones, oldest first."""
    item_ids = {id(e) for e in [e for e in evs if e.item_id == item_id][-(window // 2):]}
    recent = {id(e) for e in evs[-(window - len(item_ids)):]} if window > len(item_ids) else set()
    shown = [e for e in evs if id(e) in item_ids | recent]
    hist = build_history(user_id, shown, catalog, window=len(shown), as_of=as_of)
    hist.profile["n_events"] = len(evs)
    return hist


class IntentService:
    """Purchase-intent predictions for (user, item) pairs."""

    def __init__(self, model: ChatModel | None, baseline: LogisticBaseline | None = None, *,
                 model_sha256: str | None = None, explain: bool = True, window: int = 16,
                 prob_prompt: str = "purchase_intent.v1", explain_prompt: str = "purchase_intent_explain.v1",
                 scorer: Scorer | None = None, encoder: EncoderScorer | None = None):
        """`scorer`: None (the baseline blended with the model's log-odds), "baseline", "bert"
        (the fine-tuned encoder), "llm" (the model's P(yes) alone) or "blend" (the encoder's
        stack chosen on validation); "bert" and "blend" need `encoder`.

        Raises:
            ValueError: "bert" or "blend" without an encoder.
        """
        if scorer in ("bert", "blend") and encoder is None:
            raise ValueError(f"scorer {scorer!r} needs a trained encoder")
        self.scorer, self.encoder = scorer, encoder
        self.model, self.model_sha256, self.explain, self.window = model, model_sha256, explain, window
        # hand-set prior, used only when no fitted baseline exists: carts and past buys dominate
        self.baseline = baseline or LogisticBaseline(
            INTENT_FEATURES, [0.2, 1.2, 0.4, 1.0, -0.5, 0.1, 0.3, 1.0, 0.05], -3.0, 0.05, "hand-set prior")
        self.prob_prompt, self.explain_prompt = prob_prompt, explain_prompt

    async def predict(self, user_id: str, item_id: str, events: Sequence[BehaviorEvent],
                      catalog: Mapping[str, CatalogItem], *, as_of: datetime | None = None,
                      horizon_hours: float = 48.0, dataset: str | None = None,
                      item_base_rate: float | None = None) -> IntentPrediction:
        """Predict whether `user_id` buys `item_id` within `horizon_hours` after `as_of`.

        Args:
            events: the user's events, oldest first; only those before `as_of` are used.
            as_of: the cut-off (default: just after the last event).
            item_base_rate: the item's popularity-based purchase rate, the cold-start answer.
        """
        t0, trace = time.perf_counter(), CallTrace()
        as_of = as_of or ((events[-1].timestamp + timedelta(seconds=1)) if events else datetime.now().astimezone())
        evs = [e for e in events if e.timestamp < as_of]
        f = funnel_features(evs, item_id, as_of, catalog)
        common: dict[str, Any] = dict(user_id=user_id, item_id=item_id, dataset=dataset, as_of=as_of.isoformat(),
                                      horizon_hours=horizon_hours, funnel=asdict(f))
        known = [e for e in evs if e.item_id in catalog]
        if not known or (item_id not in catalog and f.n_views + f.n_carts + f.n_favs == 0):
            rate = item_base_rate if item_base_rate is not None else self.baseline.base_rate
            why = "no history" if not known else "unknown item"
            trace.notes.append(f"cold start ({why}): popularity-based base rate, not a personal prediction")
            if self.scorer is not None:
                trace.notes.append(f"scorer {self.scorer} was not used: a cold start has no personal cases to score")
            return IntentPrediction(**common, probability=rate, probability_source="cold_start_base_rate", scorer=self.scorer,
                                    baseline_probability=rate, reason=f"[cold start] {why}: the base purchase "
                                    f"rate {rate:.1%} is shown instead of a personal probability.",
                                    reason_source="cold_start", cold_start=True,
                                    meta=make_meta("purchase_intent", self.model, trace, [], t0, self.model_sha256))
        p_base = self.baseline.predict(f.vector())
        p_enc = None
        if self.encoder is not None and self.scorer in ("bert", "blend"):
            self.encoder.check_horizon(horizon_hours)
            p_enc = self.encoder.predict(evs, item_id, as_of, catalog)
            if f.hours_since_last is None or f.hours_since_last > 72 or f.n_views + f.n_carts + f.n_favs == 0:
                trace.notes.append("the encoder learnt from items viewed, carted or favourited in the 72 h before "
                                   "the cut-off; this item was not, so its probability is outside what it was "
                                   "trained on")
        hist = _intent_history(user_id, evs, item_id, catalog, as_of, self.window)
        title = catalog[item_id].title if item_id in catalog else f"item {item_id}"
        variables = dict(item_title=title, f=asdict(f), horizon_hours=f"{horizon_hours:g}", **hist.prompt_vars())
        asked = await ask_intent_model(self.model, self.prob_prompt, self.explain_prompt if self.explain else None,
                                       variables, hist, trace, catalog=catalog, titles=[title],
                                       probability=lambda pm: self._served(p_base, p_enc, pm, f)[0],
                                       ask_probability=self.scorer in (None, "llm"),
                                       served_by={"bert": "encoder", "blend": "blend"}.get(self.scorer or "", "baseline"))
        served = None if self.scorer is None else self._served(p_base, p_enc, asked.p_model, f, trace.notes)
        return IntentPrediction(
            **common, **answer_fields(self.baseline, p_base, asked, hist,
                                      lambda: fallback_intent_reason(f, hist, item_id), served),
            encoder_probability=None if p_enc is None else round(p_enc, 6), scorer=self.scorer,
            meta=make_meta("purchase_intent", self.model, trace, asked.prompts, t0, self.model_sha256))

    def _served(self, p_base: float, p_enc: float | None, p_model: float | None, f: Funnel,
                notes: list[str] | None = None) -> tuple[float, str]:
        """(probability, source) for the asked scorer; `notes` (meta.notes) get what was used instead."""
        notes = notes if notes is not None else []
        if self.scorer == "bert" and p_enc is not None:
            return p_enc, "bert"
        if self.scorer == "llm":
            if p_model is not None:
                return p_model, "llm"
            notes.append("scorer llm: the model gave no probability; the baseline probability is served instead")
            return p_base, "baseline"
        if self.scorer == "blend" and self.encoder is not None and p_enc is not None:
            trained = self.encoder.trained
            stack = trained.stack
            notes.append(stack.describe())
            if "llm" not in stack.members:
                notes.append("the model has weight 0 in this blend: it was not scored on the validation users")
            return stack.predict({"baseline": trained.baseline.predict(f.vector()), "bert": p_enc}), "stack"
        if self.scorer is None:
            return (self.baseline.blend or Blend())(p_base, p_model), "blend" if p_model is not None else "baseline"
        return p_base, "baseline"


def fallback_intent_reason(f: Funnel, hist: HistoryView, item_id: str) -> tuple[str, list[str]]:
    """A truthful template reason citing the item's most telling events (carts first)."""
    order = {"purchase": 0, "cart": 1, "favourite": 2, "view": 3, "click": 3}
    lines = sorted((x for x in hist.lines if x.event.item_id == item_id),
                   key=lambda x: (order.get(x.event.event_type, 9), -int(x.ref[1:])))
    refs = [x.ref for x in lines[:3]]
    return (f"[template] {f.n_views} views, {f.n_carts} carts, {f.n_favs} favourites and "
            f"{f.n_purchases} past purchases of this item", refs)
