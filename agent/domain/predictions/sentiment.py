"""Review-sentiment output schemas: polarity, aspects, the batch failure record.

An aspect must occur in the cleaned review and its span must be an exact substring (checked
when the validation context carries ``text``), so an aspect the model invents is rejected and
repaired, never reported.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from agent.domain.predictions.common import Meta
from agent.domain.text import Language

Polarity = Literal["negative", "neutral", "positive"]
POLARITIES: tuple[Polarity, ...] = get_args(Polarity)
_ALIASES = {"pos": "positive", "neg": "negative", "neu": "neutral", "1": "positive", "+1": "positive",
            "0": "neutral", "-1": "negative", "正面": "positive", "积极": "positive", "负面": "negative",
            "消极": "negative", "中性": "neutral"}


def normalise_polarity(v: object) -> object:
    """'Positive', ' NEG ', '-1' -> the closed label; anything unknown raises with the choices.

    Raises:
        ValueError: not a polarity label or alias.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if isinstance(v, str):
        key = v.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in POLARITIES:
            raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}; got {v!r}")
        return key
    return v


def normalise_probability(v: object) -> object:
    """0.9, '0.9', '87%', ' 87 % ' -> a float in [0, 1].

    Raises:
        ValueError: out of range, not finite, or unparseable.
    """
    if isinstance(v, str):
        s = v.strip()
        try:
            v = float(s[:-1].strip()) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise ValueError(f"confidence must be a number in [0, 1] or a percentage like '87%'; got {s!r}") from None
    if isinstance(v, int | float) and not isinstance(v, bool):
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"confidence must be a probability in [0, 1] (or a percentage like '87%'); got {v!r}")
        return float(v)
    return v


class AspectSentiment(BaseModel):
    """One aspect the review judges. `aspect` must occur in the cleaned review (any case) and
    `span` must be an exact substring of it (both checked when the validation context carries
    ``text``), so an aspect the model invents is rejected and repaired, never reported."""

    model_config = ConfigDict(extra="forbid")

    aspect: str = Field(min_length=1, max_length=80, description="the aspect term, e.g. 'battery'")
    polarity: Polarity
    span: str = Field(min_length=1, max_length=400, description="exact substring of the review")

    @field_validator("polarity", mode="before")
    @classmethod
    def _norm_polarity(cls, v: object) -> object:
        return normalise_polarity(v)

    @field_validator("aspect")
    @classmethod
    def _aspect_in_text(cls, v: str, info: ValidationInfo) -> str:
        text = (info.context or {}).get("text")
        if text is None or v.strip().lower() in text.lower():
            return v.strip()
        raise ValueError(f"aspect {v!r} does not occur in the review; name each aspect with the words the "
                         "review uses for it")

    @field_validator("span")
    @classmethod
    def _span_in_text(cls, v: str, info: ValidationInfo) -> str:
        text = (info.context or {}).get("text")
        if text is None or v in text:
            return v
        if v.strip() and v.strip() in text:
            return v.strip()
        raise ValueError(f"span {v!r} is not an exact substring of the review; copy the words character "
                         "for character from between <review> and </review>")


class AspectsAnswer(BaseModel):
    """The model's answer to ``sentiment_aspects.v1`` and ``.v2``."""

    model_config = ConfigDict(extra="forbid")

    aspects: list[AspectSentiment] = Field(default_factory=list, max_length=8)


def aspects_json_schema(max_aspects: int = 5) -> dict[str, Any]:
    """Schema for constrained decoding (the subset llama.cpp and vLLM both enforce)."""
    return {
        "title": "AspectsAnswer", "type": "object",
        "properties": {"aspects": {
            "type": "array", "maxItems": max_aspects,
            "items": {"type": "object", "properties": {
                "aspect": {"type": "string", "maxLength": 40},
                "polarity": {"type": "string", "enum": list(POLARITIES)},
                "span": {"type": "string", "maxLength": 200}},
                "required": ["aspect", "polarity", "span"], "additionalProperties": False}}},
        "required": ["aspects"], "additionalProperties": False,
    }


class SentimentResult(BaseModel):
    """The public answer for one review."""

    polarity: Polarity
    confidence: float = Field(ge=0, le=1, description="probability of `polarity`, in [0, 1]")
    probabilities: dict[str, float] = Field(default_factory=dict, description="label -> probability")
    language: Language
    aspects: list[AspectSentiment] = Field(default_factory=list)
    aspects_source: Literal["model", "not_requested", "unavailable"] = "not_requested"
    target_aspect: str | None = Field(default=None, description="set when polarity is toward one aspect")
    source: Literal["model", "lexicon"]
    text: str = Field(description="the cleaned text that was judged (masked, HTML stripped)")
    meta: Meta

    @field_validator("polarity", mode="before")
    @classmethod
    def _norm_polarity(cls, v: object) -> object:
        return normalise_polarity(v)

    @field_validator("confidence", mode="before")
    @classmethod
    def _norm_confidence(cls, v: object) -> object:
        return normalise_probability(v)


class SentimentFailure(BaseModel):
    """A batch record that could not be judged (bad input); the batch goes on."""

    index: int
    error: str
