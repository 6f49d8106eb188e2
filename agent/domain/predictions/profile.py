"""User-profile output schemas, and the sensitive-attribute rules every profile obeys.

The model may claim nothing about gender, age, health, religion or ethnicity: `ProfileAnswer`
rejects such keys and claims with a message the model can act on, and `UserProfile` never
carries such an attribute.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.domain.predictions.common import Cited, Evidence, Meta

Lifecycle = Literal["new", "active", "at-risk", "lapsed"]
PriceBand = Literal["budget", "mid", "premium"]

# ---- sensitive attributes --------------------------------------------------------------------

SENSITIVE: dict[str, re.Pattern[str]] = {
    "gender": re.compile(r"\b(gender|male|female|man|woman|men|women|he|she|his|her|hers|him|"
                         r"mother|father|mum|mom|dad|wife|husband|girlfriend|boyfriend)\b", re.I),
    "age": re.compile(r"\b(age|aged|ages|years old|young|elderly|senior|teen|teenager|retired|"
                      r"retiree|millennial|boomer)\b", re.I),
    "health": re.compile(r"\b(health|healthy|illness|ill|disease|diabet\w*|pregnan\w*|disab\w*|"
                         r"medical|medication|diet|allerg\w*)\b", re.I),
    "religion": re.compile(r"\b(religio\w*|christian|muslim|islam\w*|jewish|judaism|hindu\w*|"
                           r"buddhis\w*|church|mosque|synagogue|faith)\b", re.I),
    "ethnicity": re.compile(r"\b(ethnic\w*|race|racial|caucasian|asian|african|hispanic|latin[oa]|"
                            r"black|white people)\b", re.I),
}
SENSITIVE_KEYS = {"gender", "sex", "age", "age_group", "birth_year", "health", "religion",
                  "ethnicity", "race", "nationality", "marital_status"}


def sensitive_hits(text: str) -> list[str]:
    """Which sensitive attribute families `text` speaks about, e.g. ['gender: her']."""
    return [f"{k}: {m.group(0)}" for k, rx in SENSITIVE.items() if (m := rx.search(text))]


# ---- the model's answer --------------------------------------------------------------------------


class Claim(Cited):
    text: str = Field(min_length=5, max_length=240)
    evidence: list[str] = Field(min_length=1, max_length=4, description="event refs like E3")
    inferred: bool = Field(description="true when the claim is a guess from behaviour, not an observed fact")

    @field_validator("text")
    @classmethod
    def _no_sensitive(cls, v: str) -> str:
        hits = sensitive_hits(v)
        if hits:
            raise ValueError(f"claim mentions sensitive attributes ({', '.join(hits)}); describe only "
                             "shopping behaviour and say 'this customer'")
        return v


class ProfileAnswer(BaseModel):
    """What the model writes: a summary and claims, each backed by event references."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(min_length=10, max_length=600)
    claims: list[Claim] = Field(min_length=1, max_length=5)

    @model_validator(mode="before")
    @classmethod
    def _no_sensitive_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = sorted(k for k in data if str(k).lower() in SENSITIVE_KEYS)
            if bad:
                raise ValueError(f"fields {bad} are sensitive attributes ShopLens never infers; remove them")
        return data

    @field_validator("summary")
    @classmethod
    def _summary_clean(cls, v: str) -> str:
        hits = sensitive_hits(v)
        if hits:
            raise ValueError(f"summary mentions sensitive attributes ({', '.join(hits)}); remove them")
        return v


# ---- the public profile --------------------------------------------------------------------------


class Attribute(BaseModel):
    name: str
    value: str
    weight: float | None = Field(default=None, ge=0, le=1)
    kind: Literal["observed", "inferred"]
    evidence: list[Evidence] = Field(default_factory=list)


class ProfileClaim(BaseModel):
    text: str
    inferred: bool
    evidence: list[Evidence] = Field(min_length=1)


class UserProfile(BaseModel):
    user_id: str
    dataset: str | None = None
    as_of: str
    lifecycle_stage: Lifecycle
    attributes: list[Attribute]
    summary: str
    summary_source: Literal["model", "fallback", "cold_start"]
    claims: list[ProfileClaim] = Field(default_factory=list)
    cold_start: bool = False
    meta: Meta

    @model_validator(mode="after")
    def _no_sensitive(self) -> UserProfile:
        for a in self.attributes:
            if a.name.lower() in SENSITIVE_KEYS:
                raise ValueError(f"attribute {a.name!r} is sensitive and never part of a profile")
        return self
