"""Audience-targeting output schemas: the ranked users for an item or a campaign text."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from agent.domain.predictions.common import Cited, Evidence, Meta, Probability


# The model's one-line reason for targeting a user. No docstring: its JSON schema is sent to the
# model, and a description would change every recorded request.
class AudienceReason(Cited):
    reason: str = Field(min_length=5, max_length=200)
    evidence: list[str] = Field(min_length=1, max_length=3)


class TargetUser(BaseModel):
    rank: int = Field(ge=1)
    user_id: str
    score: Probability = Field(description="fused retrieval score (model-blended for the top few)")
    source_scores: dict[str, float]
    model_probability: Probability | None = None
    reason: str
    reason_source: Literal["model", "fallback", "cold_start"]
    evidence: list[Evidence] = Field(default_factory=list)


class AudiencePrediction(BaseModel):
    dataset: str | None = None
    item_id: str | None = None
    campaign_text: str | None = None
    n: int = Field(ge=1)
    users: list[TargetUser]
    cold_start: bool = False
    meta: Meta
