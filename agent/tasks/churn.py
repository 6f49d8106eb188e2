"""Churn risk: P(no purchase in the next N days after an as-of date), a risk band, drivers and a
suggested retention action.

Drivers (recency, frequency, monetary trend, category drift, rhythm) are computed in code
(`agent.tasks.profile.user_features`); the probability is an RFM logistic-regression baseline, blended
with the model's verbalizer probability of "no further order" only where a blend fitted on
validation users gave the model a weight (`agent.tasks.churn_blend`; otherwise the model has
weight 0 and ``meta.notes`` says why, while `model_probability` still shows its answer); a second,
schema-constrained call picks a retention action from a closed set and writes a reason that
cites the customer's events.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

from agent.domain.history import HistoryView, build_history
from agent.domain.predictions import Action, ChurnAnswer, ChurnPrediction, Driver, RiskBand
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import ChatModel
from agent.llm.prompting import load_prompt, render
from agent.llm.structured import CallTrace, structured_call
from agent.tasks.churn_blend import ServedChurnBlend, untrained
from agent.tasks.common import (
    LogisticBaseline,
    ask_or_degrade,
    ask_yes_no,
    evidence_from_refs,
    make_meta,
)
from agent.tasks.profile import UserFeatures, user_features
from agent.tasks.verified import verified_reason

BAND_EDGES = (0.35, 0.65)  # probability < 0.35 low, < 0.65 medium, else high
RFM_FEATURES = ["log_recency", "log_frequency", "log_monetary"]


def rfm_vector(f: UserFeatures) -> dict[str, float]:
    """The baseline's inputs: log1p of recency (days), frequency (orders), monetary (spend)."""
    return {"log_recency": math.log1p(f.recency_days or 0.0), "log_frequency": math.log1p(f.n_orders),
            "log_monetary": math.log1p(max(0.0, f.monetary))}


# How far a feature must move the baseline's logit (from the cohort's median customer) to count
# as raising or lowering the risk: 0.1 logit is about 2.5 probability points around 0.5.
DRIVER_MIN_LOGIT = 0.1
_BASELINE_NAMES = {"log_recency": "recency", "log_frequency": "frequency", "log_monetary": "monetary"}


def baseline_drivers(bl: LogisticBaseline, x: Mapping[str, float], reference: Mapping[str, float]
                     ) -> list[Driver]:
    """Why the baseline gives this customer the probability it gives, against a reference
    customer (e.g. the median of a month's buyers): per feature the logit contribution
    ``coef * (x - reference)``, largest first.

    The effects agree with the probability by construction: a customer the baseline rates riskier
    than the reference has at least one driver that raises the risk (the per-feature rules of
    `churn_drivers` can disagree with the fitted baseline, e.g. a recent one-order customer).

    Args:
        bl: the churn baseline (its features are RFM_FEATURES: log1p of days, orders, spend).
        x: this customer's baseline inputs (`rfm_vector`).
        reference: the same inputs for the reference customer.

    Returns:
        One `Driver` per baseline feature; `value` is the raw quantity (days, orders, spend),
        `detail` names it and the reference's.
    """
    out = []
    contribs = {feat: coef * (x[feat] - reference[feat]) for feat, coef in zip(bl.features, bl.coef, strict=True)}
    for feat, contrib in sorted(contribs.items(), key=lambda fc: -fc[1]):
        raw, ref = math.expm1(x[feat]), math.expm1(reference[feat])
        name = _BASELINE_NAMES.get(feat)
        detail = {"recency": f"{raw:.0f} days since the last order (median {ref:.0f})",
                  "frequency": f"{raw:.0f} order{'' if round(raw) == 1 else 's'} in total (median {ref:.0f})",
                  "monetary": f"{raw:.2f} spent in total (median {ref:.2f})"}.get(name or "", f"{feat} {x[feat]:.2f}")
        effect: Literal["raises_risk", "lowers_risk", "neutral"] = (
            "raises_risk" if contrib > DRIVER_MIN_LOGIT else "lowers_risk" if contrib < -DRIVER_MIN_LOGIT
            else "neutral")
        if name is not None:
            out.append(Driver(name=name, value=round(raw, 2), effect=effect, detail=detail))  # type: ignore[arg-type]
    return out


def risk_band(p: float) -> RiskBand:
    return "low" if p < BAND_EDGES[0] else "medium" if p < BAND_EDGES[1] else "high"


def churn_drivers(f: UserFeatures) -> list[Driver]:
    """Plain rules over the features; each says which way it pushes the risk and why."""
    rec, gap = f.recency_days or 0.0, f.median_gap_days
    due = max(30.0, 2 * gap) if gap else 60.0
    out = [Driver(name="recency", value=rec, effect="raises_risk" if rec > due else "lowers_risk",
                  detail=f"{rec:.0f} days since the last order (usual gap x2 = {due:.0f} days)")]
    eff: Literal["raises_risk", "lowers_risk", "neutral"] = (
        "raises_risk" if f.orders_last_90d == 0 else "lowers_risk" if f.orders_last_90d >= 2 else "neutral")
    out.append(Driver(name="frequency", value=float(f.n_orders), effect=eff,
                      detail=f"{f.n_orders} orders in total, {f.orders_last_90d} in the last 90 days"))
    t = f.monetary_trend
    out.append(Driver(name="monetary_trend", value=t,
                      effect="raises_risk" if t < -0.3 else "lowers_risk" if t > 0.3 else "neutral",
                      detail=f"spend last 90 days {f.spend_last_90d:.2f} vs {f.spend_prev_90d:.2f} the 90 days before"))
    if f.category_drift is not None:
        out.append(Driver(name="category_drift", value=f.category_drift,
                          effect="raises_risk" if f.category_drift > 0.8 else "neutral",
                          detail=f"{f.category_drift:.0%} of recent themes differ from earlier ones"))
    if gap is not None:
        out.append(Driver(name="rhythm", value=gap, effect="neutral",
                          detail=f"median {gap:.1f} days between orders"))
    return out


def default_action(band: RiskBand, drivers: Sequence[Driver]) -> Action:
    falling = any(d.name == "monetary_trend" and d.effect == "raises_risk" for d in drivers)
    if band == "high":
        return "win_back_offer"
    if band == "medium":
        return "reminder_of_past_favourites" if falling else "new_arrivals_in_interests"
    return "loyalty_reward" if falling else "no_action_needed"


def default_churn_baseline() -> LogisticBaseline:
    """Hand-set prior used only when no fitted baseline exists."""
    return LogisticBaseline(RFM_FEATURES, [0.9, -0.8, -0.1], -2.5, 0.45, "hand-set prior")


def driver_lines(drivers: Sequence[Driver]) -> list[str]:
    return [f"{d.name}: {d.detail} ({d.effect.replace('_', ' ')})" for d in drivers]


PROB_PROMPT = "churn_risk.v1"  # the verbalizer prompt a fitted blend is bound to (name@sha256)


class ChurnService:
    def __init__(self, model: ChatModel | None, baseline: LogisticBaseline | None = None, *,
                 model_sha256: str | None = None, explain: bool = True, window: int = 15,
                 prob_prompt: str = PROB_PROMPT, explain_prompt: str = "churn_explain.v1",
                 blend: ServedChurnBlend | None = None):
        """`blend`: the served blend (`agent.tasks.churn_blend.served_churn_blend`); None: no
        fitted blend, the model has weight 0 (said in ``meta.notes``)."""
        self.model, self.model_sha256, self.explain, self.window = model, model_sha256, explain, window
        self.baseline = baseline or default_churn_baseline()
        self.prob_prompt, self.explain_prompt = prob_prompt, explain_prompt
        self.blend = blend

    async def predict(self, user_id: str, events: Sequence[BehaviorEvent], catalog: Mapping[str, CatalogItem],
                      *, as_of: datetime, horizon_days: int = 90, dataset: str | None = None,
                      prices: Sequence[float] | None = None) -> ChurnPrediction:
        """P(no purchase in `horizon_days` after `as_of`) from events strictly before `as_of`."""
        t0, trace = time.perf_counter(), CallTrace()
        evs = [e for e in events if e.timestamp < as_of and e.item_id in catalog]
        f = user_features(evs, catalog, as_of, catalogue_prices=prices)
        drivers = churn_drivers(f) if f.n_orders else []
        common: dict[str, Any] = dict(user_id=user_id, dataset=dataset, as_of=as_of.isoformat(), horizon_days=horizon_days,
                                      features={k: v for k, v in asdict(f).items() if k != "as_of"}, drivers=drivers)
        if horizon_days != 90:
            trace.notes.append("the baseline was trained for a 90-day horizon")
        if f.n_orders == 0:
            rate = self.baseline.base_rate
            trace.notes.append("cold start: no purchase before as_of; the population churn base rate is shown")
            return ChurnPrediction(**common, probability=rate, probability_source="cold_start_base_rate",
                                   baseline_probability=rate, risk_band=risk_band(rate), action="new_arrivals_in_interests",
                                   reason=f"[cold start] No purchase before {as_of:%Y-%m-%d}: the base churn rate "
                                   f"{rate:.0%} of known customers is shown, not a personal estimate.",
                                   reason_source="cold_start", cold_start=True,
                                   meta=make_meta("churn", self.model, trace, [], t0, self.model_sha256))
        p_base = self.baseline.predict(rfm_vector(f))
        served = self.blend or untrained(dataset, horizon_days)
        trace.notes.append(served.note)
        hist = build_history(user_id, evs, catalog, window=self.window, as_of=as_of)
        prompts: list[str] = []
        p_model: float | None = None
        answer: ChurnAnswer | None = None
        variables = dict(horizon_days=horizon_days, as_of_date=f"{as_of:%Y-%m-%d}",
                         drivers=driver_lines(drivers), **hist.prompt_vars())

        async def step(model: ChatModel) -> None:
            nonlocal p_model, answer
            tpl = load_prompt(self.prob_prompt)
            prompts.append(tpl.ref)
            p_yes = await ask_yes_no(model, render(tpl, **variables), trace)
            p_model = None if p_yes is None else 1.0 - p_yes
            if self.explain:
                etpl = load_prompt(self.explain_prompt)
                prompts.append(etpl.ref)
                p_now = served.probability(p_base, p_model)[0]
                answer = await self._explain(model, etpl, {**variables, "risk_band": risk_band(p_now),
                                                           "probability": round(p_now, 2)}, hist, catalog, trace)

        await ask_or_degrade(self.model, step, trace, what="churn answer",
                             fallback="baseline probability, rule-based action")
        p, p_source = served.probability(p_base, p_model, trace.notes)
        band = risk_band(p)
        src: Literal["model", "fallback"]
        if answer is not None:
            action, reason, refs, src = answer.action, answer.reason, answer.evidence, "model"
        else:
            action, src = default_action(band, drivers), "fallback"
            reason, refs = fallback_churn_reason(drivers, hist)
        return ChurnPrediction(
            **common, probability=round(p, 6), probability_source=p_source,
            baseline_probability=round(p_base, 6), model_probability=None if p_model is None else round(p_model, 6),
            risk_band=band, action=action, reason=reason, reason_source=src,
            evidence=evidence_from_refs(hist, refs),
            meta=make_meta("churn", self.model, trace, prompts, t0, self.model_sha256))

    async def _explain(self, model: ChatModel, tpl: Any, variables: dict[str, Any], hist: HistoryView,
                       catalog: Mapping[str, CatalogItem], trace: CallTrace) -> ChurnAnswer | None:
        """The model's action and reason, the reason verified against the history, the risk band
        and the prompt's numbers (`verified_reason`), or None: the template is shown."""
        schema = ChurnAnswer.model_json_schema()
        schema["properties"]["evidence"]["items"] = {"type": "string", "enum": hist.refs}
        messages, context = render(tpl, **variables), {"refs": set(hist.refs)}
        first = await structured_call(model, messages, ChurnAnswer, json_schema=schema, context=context,
                                      max_tokens=160, trace=trace)
        return await verified_reason(model, messages, first, hist, catalog, trace, direction=variables["risk_band"],
                                     json_schema=schema, context=context, max_tokens=160)


def fallback_churn_reason(drivers: Sequence[Driver], hist: HistoryView) -> tuple[str, list[str]]:
    """The strongest risk drivers in words, citing the last order's events."""
    risky = [d.detail for d in drivers if d.effect == "raises_risk"] or [d.detail for d in drivers[:1]]
    last_basket = hist.lines[-1].event.basket_id if hist.lines else None
    refs = [x.ref for x in hist.lines if last_basket and x.event.basket_id == last_basket][-2:] or hist.refs[-1:]
    return "[template] " + "; ".join(risky), refs
