"""Churn-risk output schemas: the prediction, its drivers, and the model's answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from agent.domain.predictions.common import Cited, Evidence, Meta, Probability, normalise_label

RiskBand = Literal["low", "medium", "high"]
Action = Literal["no_action_needed", "loyalty_reward", "new_arrivals_in_interests",
                 "reminder_of_past_favourites", "win_back_offer"]


class Driver(BaseModel):
    """One computed reason the risk is what it is, and which way it pushes."""

    # monetary: total spend, a baseline feature (`agent.tasks.churn.baseline_drivers`)
    name: Literal["recency", "frequency", "monetary", "monetary_trend", "category_drift", "rhythm"]
    value: float | None
    effect: Literal["raises_risk", "lowers_risk", "neutral"]
    detail: str


class ChurnAnswer(Cited):
    """The model's part: a retention action from the closed set and a reason citing events."""

    action: Action
    reason: str = Field(min_length=5, max_length=300)
    evidence: list[str] = Field(min_length=1, max_length=4, description="event refs like E3")

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, v: object) -> object:
        return normalise_label(v)


class ChurnPrediction(BaseModel):
    """P(no purchase within `horizon_days` after `as_of`), a band, drivers and an action."""

    user_id: str
    dataset: str | None = None
    as_of: str
    horizon_days: int = Field(ge=1, le=730)
    probability: Probability = Field(description="P(no purchase within horizon_days after as_of)")
    probability_source: Literal["blend", "baseline", "cold_start_base_rate"]
    baseline_probability: Probability
    model_probability: Probability | None = None
    risk_band: RiskBand
    drivers: list[Driver]
    features: dict[str, Any]
    action: Action
    reason: str
    reason_source: Literal["model", "fallback", "cold_start"]
    evidence: list[Evidence] = Field(default_factory=list)
    cold_start: bool = False
    meta: Meta

    @field_validator("risk_band", mode="before")
    @classmethod
    def _band(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v
