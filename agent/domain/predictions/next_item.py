"""Next-item output schemas: what ShopLens returns, and what the model is allowed to say.

`NextItemPrediction` is the public contract (CLI JSON, API body). `Explanation` is the model's
answer for the explanation call; its rules that depend on the request (which labels and event
references exist) come through pydantic validation context, and its error messages are written
so the model can fix its answer on the repair attempt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from agent.domain.predictions.common import Evidence, Meta, check_refs


class RankedItem(BaseModel):
    rank: int = Field(ge=1)
    item_id: str
    title: str
    score: float = Field(ge=0, le=1, description="fused score, higher is better")
    source_scores: dict[str, float] = Field(
        description="per-source scores in [0, 1] (embedding, covisit, similar_users, popularity, recent, llm)"
    )
    reason: str
    reason_source: Literal["model", "fallback"]
    evidence: list[Evidence] = Field(default_factory=list)


class NextItemPrediction(BaseModel):
    """Top-k next items for one user, each with a reason citing the user's own events."""

    user_id: str
    dataset: str | None = None
    k: int = Field(ge=1)
    items: list[RankedItem]
    intent_summary: str
    summary_source: Literal["model", "fallback"]
    cold_start: bool = False
    meta: Meta

    @model_validator(mode="after")
    def _distinct_ranked(self) -> NextItemPrediction:
        ids = [i.item_id for i in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("items must be distinct")
        if [i.rank for i in self.items] != list(range(1, len(ids) + 1)):
            raise ValueError("ranks must be 1..n in order")
        return self


# ---- the model's answer for the explanation call -------------------------------------------


class ItemReason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: str = Field(description="the product's letter label")
    reason: str = Field(min_length=3, max_length=300)
    evidence: list[str] = Field(min_length=1, max_length=3, description="event refs like E3")

    @field_validator("item", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("evidence", mode="before")
    @classmethod
    def _refs_upper(cls, v: object) -> object:
        if isinstance(v, list):
            return [x.strip().upper() if isinstance(x, str) else x for x in v]
        return v

    @field_validator("evidence")
    @classmethod
    def _known_refs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return check_refs(v, info)


class Explanation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reasons: list[ItemReason]
    intent_summary: str = Field(min_length=10, max_length=1200)

    @model_validator(mode="after")
    def _one_reason_per_label(self, info: ValidationInfo) -> Explanation:
        labels = (info.context or {}).get("labels")
        if labels is None:
            return self
        got = [r.item for r in self.reasons]
        unknown = [x for x in got if x not in labels]
        if unknown:
            raise ValueError(f"items {unknown} are not recommended products; use only {labels}")
        missing = [x for x in labels if x not in got]
        dupes = sorted({x for x in got if got.count(x) > 1})
        if missing or dupes:
            raise ValueError(
                f"give exactly one reason for each of {labels}"
                + (f"; missing {missing}" if missing else "")
                + (f"; repeated {dupes}" if dupes else "")
            )
        return self


def explanation_json_schema(labels: list[str], refs: list[str], max_words: int = 25,
                            summary_max_chars: int = 400) -> dict[str, Any]:
    """JSON schema for constrained decoding: one reason per label, in the labels' order
    (``prefixItems``: position i can only be label i, so the grammar itself rules out a missing
    or repeated product, which cost a whole repair call on a CPU), event refs as an enum, so no
    invented events. Kept to the subset llama.cpp and vLLM both enforce (llama.cpp reads
    ``prefixItems`` only when there is no ``items``).

    Args:
        labels: the products' letters, best first (``A``, ``B``, ...).
        refs: the event references the history shows (``E1`` ...).
        max_words: a reason's cap, as ``maxLength = 8 * max_words`` characters.
        summary_max_chars: the intent summary's cap (characters).
    """

    def reason(label: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "item": {"type": "string", "enum": [label]},
                "reason": {"type": "string", "maxLength": max_words * 8},
                "evidence": {"type": "array", "minItems": 1, "maxItems": 3,
                             "items": {"type": "string", "enum": refs}},
            },
            "required": ["item", "reason", "evidence"],
            "additionalProperties": False,
        }

    return {
        "title": "Explanation",
        "type": "object",
        "properties": {
            "reasons": {"type": "array", "minItems": len(labels), "maxItems": len(labels),
                        "prefixItems": [reason(lab) for lab in labels]},
            "intent_summary": {"type": "string", "maxLength": summary_max_chars},
        },
        "required": ["reasons", "intent_summary"],
        "additionalProperties": False,
    }


def explanation_schema_enums(schema: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(labels in order, event refs) of a schema from `explanation_json_schema`."""
    slots = schema["properties"]["reasons"]["prefixItems"]
    labels = [slot["properties"]["item"]["enum"][0] for slot in slots]
    return labels, slots[0]["properties"]["evidence"]["items"]["enum"] if slots else []