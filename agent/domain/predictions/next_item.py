"""Next-item output schemas: what ShopLens returns, and what the model is allowed to say.

`NextItemPrediction` is the public contract (CLI JSON, API body). `Explanation` is the model's
answer for the explanation call; its rules that depend on the request (which labels and event
references exist) come through pydantic validation context, and its error messages are written
so the model can fix its answer on the repair attempt.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from agent.domain.predictions.common import Evidence, Meta


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
    """The model's rationale for one recommended product: a short clause the answer places after
    the product's facts (which are written from the data, not by the model)."""

    model_config = ConfigDict(extra="forbid")

    item: str = Field(description="the product's letter label")
    why: str = Field(min_length=3, max_length=300, description="what the product has in common with the "
                     "customer's events its facts name")

    @field_validator("item", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.strip().upper() if isinstance(v, str) else v


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


def why_max_chars(max_words: int) -> int:
    """A "why"'s schema cap in characters: room for `max_words` long words, so that only a
    clause far over the asked length reaches it (and is then cut mid-word: a verifier violation)."""
    return 10 * max_words


# How a "why" must open (the decoding pattern, `why_pattern`): a phrase about what the item
# shares with its cited event, never a claim about what the customer did.
WHY_OPENINGS = ("the same", "another", "a matching", "a similar")


def why_pattern(max_words: int) -> str:
    """The "why"'s decoding pattern: one of `WHY_OPENINGS`, then lower-case letters, spaces and
    light punctuation only, so no upper-case title, digit or event reference can be written
    (Online Retail's titles are upper case) and the phrase says what the item shares, e.g.
    "the same retro christmas style". llama.cpp and vLLM both decode JSON-schema patterns."""
    return f"^({'|'.join(WHY_OPENINGS)}) [a-z ,'-]{{3,{why_phrase_max(max_words)}}}$"


def why_phrase_max(max_words: int) -> int:
    """The pattern's cap on the phrase after the opening (the whole "why" stays within
    `why_max_chars`); a phrase this long was stopped by the grammar, mid-word."""
    return why_max_chars(max_words) - max(len(o) for o in WHY_OPENINGS) - 1


def why_cut_at(max_words: int) -> int:
    """The shortest length of a "why" the grammar cut: the shortest opening plus the cap."""
    return min(len(o) for o in WHY_OPENINGS) + 1 + why_phrase_max(max_words)


def explanation_json_schema(labels: list[str], max_words: int = 12,
                            summary_max_chars: int = 240) -> dict[str, Any]:
    """JSON schema for constrained decoding: one "why" per label, in the labels' order
    (``prefixItems``: position i can only be label i, so the grammar itself rules out a missing
    or repeated product, which cost a whole repair call on a CPU). Kept to the subset llama.cpp
    and vLLM both enforce (llama.cpp reads ``prefixItems`` only when there is no ``items``).
    The evidence is not the model's to choose: each product's facts and cited events come from
    the pipeline's retrieval sources (`agent.tasks.next_item.reason_facts`).

    Args:
        labels: the products' letters, best first (``A``, ``B``, ...).
        max_words: a "why"'s asked length; its pattern (`why_pattern`) caps it at
            `why_max_chars` characters (a phrase cut there is caught by the verifier).
        summary_max_chars: the intent summary's cap (characters).
    """

    def reason(label: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "item": {"type": "string", "enum": [label]},
                # the pattern bounds the length itself: xgrammar (vLLM) drops a maxLength beside a
                # pattern (vllm-project/vllm#45592), so none is sent
                "why": {"type": "string", "pattern": why_pattern(max_words)},
            },
            "required": ["item", "why"],
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


def explanation_schema_labels(schema: dict[str, Any]) -> list[str]:
    """The labels, in order, of a schema from `explanation_json_schema`."""
    return [slot["properties"]["item"]["enum"][0] for slot in schema["properties"]["reasons"]["prefixItems"]]
