"""Purchase-intent output schemas, per item and per session.

Both predictions share their answer (`IntentFields`: the blended probability, its inputs, the
funnel stage, the reason and its evidence, the envelope); each adds its subject first (the item
and its funnel, or the session and the horizon in words).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from agent.domain.predictions.common import Cited, Evidence, Meta, Probability, normalise_label

Stage = Literal["browsing", "considering", "ready_to_buy", "already_bought"]
# Who gives an item's probability (`agent.tasks.intent`, `agent.tasks.click`), in one place.
IntentScorer = Literal["baseline", "bert", "llm", "blend"]
ClickScorer = Literal["baseline", "bert", "blend"]


class IntentAnswer(Cited):
    """The model's explanation: the funnel stage and a reason citing event references."""

    stage: Stage
    reason: str = Field(min_length=5, max_length=300)
    evidence: list[str] = Field(min_length=1, max_length=4, description="event refs like E3")

    @field_validator("stage", mode="before")
    @classmethod
    def _stage(cls, v: object) -> object:
        return normalise_label(v)


class IntentFields(BaseModel):
    """The answer both intent predictions give (what `agent.tasks.intent.answer_fields` fills)."""

    probability: Probability
    probability_source: Literal["blend", "baseline", "cold_start_base_rate", "bert", "llm", "stack"] = Field(
        description="blend: baseline + the model's log-odds (the default); baseline, bert or llm: that scorer "
                    "alone; stack: the blend of trained scorers chosen on validation (`scorer: blend`)")
    baseline_probability: Probability
    model_probability: Probability | None = None
    encoder_probability: Probability | None = Field(default=None, description="the fine-tuned BERT encoder's P")
    scorer: IntentScorer | None = Field(
        default=None, description="the scorer asked for; None: the default blend of baseline and model")
    stage: Stage | None = None
    reason: str
    reason_source: Literal["model", "fallback", "cold_start"]
    evidence: list[Evidence] = Field(default_factory=list)
    cold_start: bool = False
    meta: Meta


class _ItemSubject(BaseModel):
    user_id: str
    item_id: str
    dataset: str | None = None
    as_of: str
    horizon_hours: float = Field(gt=0)
    funnel: dict[str, Any]


class _SessionSubject(BaseModel):
    user_id: str
    dataset: str | None = None
    as_of: str
    horizon_hours: float | None = Field(default=None, gt=0, description="None: the rest of the current session")
    horizon: str = Field(description="the horizon in words")
    session: dict[str, Any]


# Pydantic lists the fields of the last base first: the subject, then the shared answer.
class IntentPrediction(IntentFields, _ItemSubject):
    """P(the user buys this item within `horizon_hours` after `as_of`), with funnel evidence."""


class SessionIntentPrediction(IntentFields, _SessionSubject):
    """P(the user buys anything later in the current session, or within `horizon_hours`)."""


class ClickPrediction(_ItemSubject):
    """P(the user views or clicks this item within `horizon_hours` after `as_of`): the trained
    click encoder's scorers (`shoplens train --task click --model bert`). No generative model is
    asked (there is no click prompt); the reason is a labelled template over the funnel."""

    probability: Probability
    probability_source: Literal["baseline", "bert", "stack", "cold_start_base_rate", "untouched_base_rate"] = Field(
        description="baseline: the funnel logistic regression fitted on the click cases; bert: the fine-tuned "
                    "encoder; stack: the blend chosen on validation users; cold_start_base_rate: no history; "
                    "untouched_base_rate: the user did not touch the item in the 72 h look-back, so the answer "
                    "is the data's chance that such an item is first viewed within the horizon (the scorers' "
                    "P for it is relative to sampled candidates; it is in encoder_probability, for ranking)")
    scorer: ClickScorer
    baseline_probability: Probability
    encoder_probability: Probability | None = None
    reason: str
    reason_source: Literal["template", "cold_start"]
    cold_start: bool = False
    touched_recently: bool = Field(default=True, description="the user viewed, carted or favourited the item in "
                                   "the 72 h before as_of (the cases the scorers' probabilities are calibrated on)")
    meta: Meta
