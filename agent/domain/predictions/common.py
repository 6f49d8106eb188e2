"""What every prediction shares: the `Meta` envelope, `Evidence`, and the validators the model's
answers use (event references, probabilities, closed labels).

Pure: no model, no I/O. The task kit (`agent.tasks.common`) re-exports these for the tasks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from agent.domain.history import HistoryView


class ModelStep(BaseModel):
    """The model calls of one step of an answer (the LLM ranking, the explanation) against the
    step's prompt-token budget."""

    step: str = Field(description="rank | explain")
    calls: int = Field(ge=0, description="model calls of the step, repairs included")
    prompt_tokens: int = Field(ge=0, description="summed over the calls, as the server reported them")
    cached_tokens: int = Field(default=0, ge=0, description="of prompt_tokens, reused from the server's prefix cache")
    completion_tokens: int = Field(ge=0)
    prompt_estimate: int = Field(ge=0, description="the step's prompt before it was sent: an upper-bound "
                                 "estimate of one call's prompt tokens (agent.llm.prompting.estimate_tokens)")
    prompt_budget: int | None = Field(default=None, description="the most prompt tokens one call may take; "
                                      "the history shown was cut to fit (null: no budget)")


class Verification(BaseModel):
    """What the verifier (`agent.domain.verify`) found in the sentences the model wrote for this
    answer. Each was checked before it was returned: as written, after one repair round with the
    violations fed back, or replaced by the task's template sentence (labelled in its text)."""

    checked: int = Field(ge=0, description="model-written sentences checked")
    verified: int = Field(ge=0, description="passed as first written")
    repaired: int = Field(ge=0, description="passed after the one repair round")
    replaced: int = Field(ge=0, description="still wrong after the repair: the labelled template sentence is shown")
    violations: list[str] = Field(default_factory=list, description="what was wrong, by sentence "
                                  "('B: names ...'); 'repair:' marks a violation the repaired sentence still had")


class Meta(BaseModel):
    """How an answer was made: enough to reproduce it and to judge it."""

    task: str
    prompt_versions: list[str] = Field(default_factory=list)
    model_id: str | None = None
    model_sha256: str | None = None
    attempts: int = Field(default=0, ge=0, description="model calls made, repairs included")
    salvaged: int = Field(default=0, ge=0, description="model replies accepted after a lenient JSON parse "
                          "(code fence, think block, quotes, trailing commas, whitespace run) instead of a repair")
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    latency_s: float = Field(default=0.0, ge=0, description="wall time of the whole request")
    model_latency_s: float = Field(default=0.0, ge=0, description="time spent waiting on the model")
    degraded: bool = False
    degraded_reason: str | None = None
    notes: list[str] = Field(default_factory=list)
    steps: list[ModelStep] = Field(default_factory=list, description="per model step: calls, tokens, "
                                   "estimate and budget (next-item)")
    verification: Verification | None = Field(default=None, description="the verifier's account of the "
                                              "model-written sentences (null: the model wrote none)")


class Evidence(BaseModel):
    """A reference to one of this user's real events."""

    ref: str = Field(description="the reference shown to the model, e.g. E3")
    event_id: str
    item_id: str
    event_type: str
    timestamp: str
    summary: str


# ---- event references ------------------------------------------------------------------------


def evidence_from_refs(hist: HistoryView, refs: Sequence[str]) -> list[Evidence]:
    """Map event references (E3, ...) to real events; unknown refs are dropped."""
    found = [(r, x) for r in dict.fromkeys(refs) if (x := hist.resolve(r)) is not None]
    return [Evidence(ref=r, event_id=x.event.event_id, item_id=x.event.item_id, event_type=x.event.event_type,
                     timestamp=x.event.timestamp.isoformat(), summary=x.text) for r, x in found]


def normalise_refs(v: object) -> object:
    """'e3' -> 'E3'; a single string becomes a one-element list."""
    v = [v] if isinstance(v, str) else v
    return [x.strip().upper() if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


def check_refs(v: list[str], info: ValidationInfo) -> list[str]:
    """Reject refs that are not in the shown history (refs come via validation context).

    Raises:
        ValueError: a ref not in ``info.context["refs"]``; the message lists the allowed refs.
    """
    refs = (info.context or {}).get("refs")
    if refs is not None:
        bad = [r for r in v if r not in refs]
        if bad:
            allowed = ", ".join(sorted(refs, key=lambda r: int(r[1:]) if r[1:].isdigit() else 0))
            raise ValueError(f"evidence {bad} are not event references in the history; use only {allowed}")
    return list(dict.fromkeys(v))


class Cited(BaseModel):
    """Base of every model answer with an ``evidence`` list of event refs: 'e3' -> 'E3', and
    refs not in the shown history (validation context ``refs``) are rejected."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("evidence", mode="before", check_fields=False)
    @classmethod
    def _refs_norm(cls, v: object) -> object:
        return normalise_refs(v)

    @field_validator("evidence", check_fields=False)
    @classmethod
    def _refs_known(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return check_refs(v, info)


# ---- probabilities and labels ------------------------------------------------------------------


def parse_probability(v: object) -> object:
    """'87%' -> 0.87, '0.87' -> 0.87; anything outside [0, 1] is left for the bound to reject.

    Raises:
        ValueError: a string that is not a number, or a number outside [0, 1].
    """
    if isinstance(v, str):
        s = v.strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", s)
        if m:
            return float(m.group(1)) / 100.0
        try:
            return float(s)
        except ValueError as e:
            raise ValueError(f"probability {v!r} is not a number; give a decimal in [0, 1], e.g. 0.35") from e
    if isinstance(v, int | float) and not isinstance(v, bool) and not 0 <= v <= 1:
        raise ValueError(f"probability {v} is outside [0, 1]; give a decimal such as 0.35, not a percentage")
    return v


Probability = Annotated[float, BeforeValidator(parse_probability), Field(ge=0, le=1)]


def normalise_label(v: object) -> object:
    """'Ready to buy' -> 'ready_to_buy', 'HIGH' -> 'high', 'At Risk' -> 'at-risk' is the caller's map."""
    return re.sub(r"[\s\-]+", "_", v.strip().lower()) if isinstance(v, str) else v
