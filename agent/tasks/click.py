"""Click prediction: P(user views or clicks the item within the horizon), from the trained click encoder.

The scorers are the ones ``shoplens train --task click --model bert`` fits and saves
(`agent.tasks.encoder_train`): the funnel logistic regression refitted on the click cases
(``baseline``), the fine-tuned MiniLM (``bert``), and the blend of the two chosen on validation
users (``blend``, the default). The case is built exactly as in training: the user's events
strictly before `as_of`, verbalised by ``prompts/encoder_case.v1``. No generative model is asked:
there is no click prompt, and the LLM's yes/no was not better than the baseline on purchases
(docs/tasks_results.md). The reason is a labelled template over the funnel counts.

Scope: the click cases pair each item first viewed within the horizon with 2 sampled items the
user never touched, so for an item the user did not touch in the 72 h look-back the scorers' P is
relative (1 in 3 such cases is positive), not a chance. The answer for such an item is the data's
chance that an untouched item is first viewed (`untouched_view_rate`, in the manifest), labelled
``untouched_base_rate``; the scorers' P stays in ``encoder_probability`` for ranking.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, Literal

from agent.domain.predictions import ClickPrediction, ClickScorer
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.structured import CallTrace
from agent.tasks.common import make_meta
from agent.tasks.encoder_cases import TOUCH
from agent.tasks.encoder_train import EncoderScorer
from agent.tasks.intent import Funnel, funnel_features
from agent.tasks.rows import INTENT_LOOKBACK_H

LOOKBACK = timedelta(hours=INTENT_LOOKBACK_H)  # the click cases' look-back (agent.tasks.encoder_cases)
SOURCE: dict[str, Literal["baseline", "bert", "stack"]] = {"baseline": "baseline", "bert": "bert", "blend": "stack"}


def click_reason(f: Funnel) -> str:
    """A truthful template sentence over the funnel (the counts the scorers read)."""
    if f.n_views + f.n_carts + f.n_favs == 0:
        return "[template] The user has not viewed, carted or favourited this item before."
    last = "" if f.hours_since_last is None else f", the last {f.hours_since_last:.1f} h before"
    return (f"[template] {f.n_views} views, {f.n_carts} carts and {f.n_favs} favourites of this item "
            f"before the cut-off{last}.")


class ClickService:
    """P(click within the horizon) for (user, item) pairs from a dataset's trained click encoder."""

    def __init__(self, encoder: EncoderScorer, scorer: ClickScorer = "blend"):
        """Raises:
            ValueError: `encoder` was trained for purchases, not clicks.
        """
        if encoder.task != "click":
            raise ValueError(f"ClickService needs a click encoder, got one trained for {encoder.task}")
        self.encoder, self.scorer = encoder, scorer

    def predict(self, user_id: str, item_id: str, events: Sequence[BehaviorEvent],
                catalog: Mapping[str, CatalogItem], *, as_of: datetime | None = None,
                horizon_hours: float | None = None, dataset: str | None = None) -> ClickPrediction:
        """Predict whether `user_id` views or clicks `item_id` within the horizon after `as_of`.

        Args:
            events: the user's events, oldest first; only those before `as_of` are read.
            as_of: the cut-off (default: one second after the last event).
            horizon_hours: must equal the encoder's trained horizon (default: that horizon).

        Raises:
            RequestError: (``horizon_hours``) another horizon than the encoder was trained for.
        """
        t0, trace = time.perf_counter(), CallTrace()
        horizon = self.encoder.horizon_h if horizon_hours is None else horizon_hours
        self.encoder.check_horizon(horizon)
        as_of = as_of or ((events[-1].timestamp + timedelta(seconds=1)) if events else datetime.now().astimezone())
        evs = [e for e in events if e.timestamp < as_of]
        f = funnel_features(evs, item_id, as_of, catalog)
        common: dict[str, Any] = dict(user_id=user_id, item_id=item_id, dataset=dataset, as_of=as_of.isoformat(),
                      horizon_hours=horizon, funnel=asdict(f), scorer=self.scorer)
        known = any(e.item_id in catalog for e in evs)
        if not known or (item_id not in catalog and f.n_views + f.n_carts + f.n_favs == 0):
            rate = self.encoder.trained.baseline.base_rate
            why = "no history" if not known else f"unknown item {item_id!r} (not in the catalogue)"
            trace.notes.append(f"cold start ({why}): the click rate of the training cases, not a personal prediction")
            return ClickPrediction(**common, probability=rate, probability_source="cold_start_base_rate",
                                   baseline_probability=rate, cold_start=True, reason_source="cold_start",
                                   reason=f"[cold start] {why}: the training cases' click rate {rate:.1%} is "
                                          "shown instead of a personal probability.",
                                   meta=make_meta("click", None, trace, [], t0))
        p = self.encoder.predict_many([(evs, item_id, as_of)], catalog)
        man = self.encoder.trained.manifest
        if self.scorer == "blend":
            trace.notes.append(self.encoder.trained.stack.describe())
        cuts = man.get("cutoffs") or ["?"]
        trace.notes.append(f"click encoder trained on {self.encoder.dataset} cut-offs {cuts[0]} .. {cuts[-1]} "
                           f"(template {man.get('template')}); no generative model asked")
        with contextlib.suppress(ValueError, TypeError):
            seen_until = datetime.fromisoformat(cuts[-1]) + timedelta(hours=self.encoder.horizon_h)
            if as_of - seen_until > timedelta(days=30):
                trace.notes.append(f"as_of is {(as_of - seen_until).days} days after the last label the encoder "
                                   f"learnt from ({seen_until:%Y-%m-%d}): its probabilities are extrapolated")
        scored = round(float(p[self.scorer][0]), 6)
        touched = any(e.item_id == item_id and e.event_type in TOUCH and e.timestamp >= as_of - LOOKBACK for e in evs)
        chance = man.get("untouched_view_rate")
        if not touched and isinstance(chance, float):
            trace.notes.append(f"not viewed, carted or favourited in the 72 h before as_of: the click cases hold such "
                               f"items 1 viewed to 2 sampled, so the {self.scorer} P {scored:.3f} ranks candidates "
                               "but is not a chance; the answer is the data's chance that an untouched item is "
                               "first viewed within the horizon")
            return ClickPrediction(**common, probability=round(chance, 8), probability_source="untouched_base_rate",
                                   baseline_probability=round(float(p["baseline"][0]), 6),
                                   encoder_probability=round(float(p["bert"][0]), 6), touched_recently=False,
                                   reason=f"[template] Not touched in the 72 h before the cut-off: {chance:.2e} is the "
                                          "chance that such an item is first viewed within the horizon.",
                                   reason_source="template", meta=make_meta("click", None, trace, [], t0))
        if not touched:
            trace.notes.append("not touched in the 72 h before as_of, and this encoder's manifest has no "
                               "untouched_view_rate (trained before it was recorded): the probability ranks "
                               "candidates but overstates the chance; retrain to get the calibrated answer")
        return ClickPrediction(**common, probability=scored, probability_source=SOURCE[self.scorer],
                               baseline_probability=round(float(p["baseline"][0]), 6),
                               encoder_probability=round(float(p["bert"][0]), 6), touched_recently=touched,
                               reason=click_reason(f), reason_source="template",
                               meta=make_meta("click", None, trace, [], t0))
