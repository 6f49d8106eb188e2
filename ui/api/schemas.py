"""Request and response bodies of the HTTP API (the event and prediction schemas are agent's)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from agent.app.events import guard_timestamp, out_of_range_timestamp
from agent.app.results import (
    DatasetSummary,
    EventError,
    IndexUpdates,
    IngestResult,
    SentimentBatch,
    SentimentBatchMeta,
    UserEventsPage,
)
from agent.domain.predictions import ClickScorer, IntentScorer
from agent.domain.schemas import BehaviorEvent, NoNul, Stripped

__all__ = ["EventError", "SentimentBatchMeta", "guard_timestamp", "out_of_range_timestamp"]  # re-exported

# Used as a folder name under the workspace: no path separators, no dot-dot.
DatasetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
                                   examples=["online-retail"], description="an ingested dataset")]
UserId = Annotated[str, Stripped, Field(min_length=1, max_length=256, examples=["17850"]), NoNul]

# Numbers in request bodies are strict (`strict=True` on each int and float field): pydantic's lax
# mode reads JSON true as 1 and "5" as 5, so {"k": true} would ask for one item. An int field
# takes only a JSON integer; a float field a JSON number. Timestamps (`as_of`, `timestamp`) take a
# string or a number, and refuse a boolean with `not_a_boolean`. Booleans are strict the same way:
# only JSON true/false, so "create": "yes" or "use_llm": 0 is a 422, not a guess.


def not_a_boolean(value: object) -> object:
    """A timestamp as given, unless it is a boolean (lax mode would read true as unix second 1)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a timestamp: send ISO-8601 or unix seconds/ms")
    return value


ApiEvent = Annotated[BehaviorEvent, BeforeValidator(guard_timestamp)]


class NextItemRequest(BaseModel):
    """Top-k next items for a stored user, or for a user whose events are given inline."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    user_id: UserId
    k: int = Field(default=5, ge=1, le=20, strict=True, description="how many items")
    events: list[ApiEvent] | None = Field(
        default=None, description="the user's events, for users the store has not seen (all with this "
        "user_id); when given, the store is not read. Each event_id counts once, as in POST /v1/events "
        "(the client's, else the content hash), so a retried batch is not doubled; meta.notes says so")
    as_of: Annotated[
        str | int | float | None,
        BeforeValidator(not_a_boolean),
        WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
                        "description": "only events strictly before this time (ISO-8601 or unix s/ms)"}),
    ] = None
    repurchase: bool = Field(strict=True, default=False, description="allow items the user already bought")
    use_llm: bool = Field(strict=True, default=True, description="false: retrieval fusion only, no model")
    candidates: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=200,
        description="rank exactly these catalogue item ids (your own candidate set) instead of "
        "retrieving candidates; k is capped at their number")
    wait_s: float | None = Field(
        default=None, ge=0, le=300, strict=True,
        description="progressive answer: the served pipeline without the model comes back at once "
        "(milliseconds) or after waiting up to this many seconds for the model's refinement; poll "
        "GET /v1/next-item/{recommendation_id} or follow .../events (SSE) for the rest. Omitted: "
        "wait for the whole explained answer (up to the server's deadline)")
    stored: bool = Field(
        strict=True,
        default=False, description="serve the user's precomputed answer (`shoplens precompute`) in "
        "milliseconds when there is one, with `computed_at` and `stale`; else (or with events, "
        "candidates, as_of or repurchase) answer as without it")


class NextItemBatchRequest(BaseModel):
    """Top-k next items for many stored users at once."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    user_ids: list[UserId] = Field(min_length=1, max_length=10_000, description="stored users; more than the "
                                   "server's SHOPLENS_MAX_BATCH_USERS (default 100) is refused with 413")
    k: int = Field(default=5, ge=1, le=20, strict=True, description="how many items")
    use_llm: bool = Field(strict=True, default=False, description="for users without a stored answer: true asks the model "
                          "(a full model answer per user: slow); false: the served pipeline without it")
    stored: bool = Field(strict=True, default=True, description="serve each user's precomputed answer when there is one")


# The raw events are validated one by one in the route, so one bad event does not reject the
# batch; the documented schema is BehaviorEvent's.
RawEvent = Annotated[dict[str, Any], WithJsonSchema(BehaviorEvent.model_json_schema())]


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    events: list[RawEvent] = Field(min_length=1, description="events; each is validated on its own")
    create: bool = Field(strict=True, default=False, description="create `dataset` if it does not exist; false (default): "
                         "an unknown dataset is refused with 422 `unknown_dataset`, so a misspelt name never "
                         "starts a new dataset")


class IngestResponse(IngestResult):
    """The outcome of a batch: counts, the stored ids, and each bad event's field and message."""


class UserEvents(UserEventsPage):
    """A page of a user's stored events, oldest first."""


class DeleteResponse(BaseModel):
    dataset: str
    user_id: str
    deleted_events: int
    removed_from_indexes: Literal[True] = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model: dict[str, Any]
    indexes: dict[str, str]  # dataset -> index state; only for a request with a known API key
    indexes_by_state: dict[str, int] = {}  # index state -> datasets in it
    names_hidden: bool = False  # no key was sent: `indexes` is empty
    # dataset -> how current its loaded user-side indexes are (issue 17); only with a known key
    index_updates: dict[str, IndexUpdates] = {}
    reason: str | None = None


# ---- the task routes (responses are agent's prediction schemas) -------------------------------

AsOf = Annotated[
    str | int | float | None,
    BeforeValidator(not_a_boolean),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}, {"type": "null"}],
                    "description": "only events strictly before this time (ISO-8601 or unix s/ms)"}),
]
UseLlm = Annotated[bool, Field(strict=True, description="false: answer without the model (baseline / template / lexicon)")]
ItemId = Annotated[str, Field(min_length=1, max_length=256, examples=["85123A"])]


class _UserItemRequest(BaseModel):
    """A stored user and an item, as of a time: what the per-item predictions take first."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    user_id: UserId
    item_id: ItemId
    as_of: AsOf = None


class PurchaseIntentRequest(_UserItemRequest):
    """Will this stored user buy this item within `horizon_hours` of `as_of`?"""

    horizon_hours: float = Field(default=48.0, gt=0, le=24 * 90, strict=True)
    use_llm: UseLlm = True
    scorer: IntentScorer | None = Field(
        default=None, description="who gives the probability: baseline (funnel logistic regression), bert (the "
        "fine-tuned encoder; `shoplens train --task purchase --model bert` first), llm (the model's yes/no "
        "probability), blend (the trained stack chosen on validation); default: the baseline blended with the "
        "model's log-odds")


class ClickRequest(_UserItemRequest):
    """Will this stored user view or click this item within the click encoder's horizon of `as_of`?"""

    horizon_hours: float | None = Field(default=None, gt=0, le=24 * 90, strict=True,
                                        description="must be the encoder's trained horizon; null: that horizon")
    scorer: ClickScorer = Field(
        default="blend", description="baseline (funnel logistic regression fitted on the click cases), bert (the "
        "fine-tuned encoder), blend (the two stacked on validation users)")


class SessionIntentRequest(BaseModel):
    """Will this stored user buy anything later in the current session (or within `horizon_hours`
    of `as_of`)? The current session holds the user's last events before `as_of`. Sessions follow
    the events' `session_id` where they carry one, else a session ends after 30 minutes without
    activity."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    user_id: UserId
    as_of: AsOf = None
    horizon_hours: float | None = Field(default=None, gt=0, le=24 * 90, strict=True,
                                        description="default (null): the rest of the current session")
    use_llm: UseLlm = True


class ChurnRequest(BaseModel):
    """Will this stored user make no purchase within `horizon_days` after `as_of`?"""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    user_id: UserId
    as_of: AsOf = Field(default=None, description="default: the dataset's last event time")
    horizon_days: int = Field(default=90, ge=1, le=730, strict=True)
    use_llm: UseLlm = True


class ProfileRequest(BaseModel):
    """A stored user's profile: computed attributes plus a model-written, cited summary."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    user_id: UserId
    as_of: AsOf = None
    use_llm: UseLlm = True


class SentimentRequest(BaseModel):
    """A batch of review texts (at most SHOPLENS_MAX_SENTIMENT_TEXTS, each at most
    SHOPLENS_MAX_TEXT_CHARS characters; larger is 413)."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Annotated[str, Field(min_length=1, max_length=20_000)]] = Field(
        min_length=1, examples=[["Arrived broken, support never answered.", "Lovely mug, fast delivery."]])
    aspects: bool = Field(strict=True, default=False, description="also extract aspect-level sentiment (one more model call each)")
    use_llm: UseLlm = True


class SentimentResponse(SentimentBatch):
    """One result per text, in request order, and the batch's counts."""


class AudienceRequest(BaseModel):
    """The users most likely to buy an item, or to answer a campaign text (give one of them)."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    item_id: ItemId | None = None
    campaign_text: str | None = Field(default=None, min_length=1, max_length=2_000)
    n: int = Field(default=50, ge=1, le=500, strict=True)
    use_llm: UseLlm = True
    predicted: Literal["click", "purchase"] | None = Field(
        default=None, description="with item_id: also rank by the dataset's fine-tuned click or purchase encoder "
        "(P within its horizon) over the fusion's top 200 users (`shoplens train --task click|purchase --model bert` "
        "first); null: retrieval fusion only")


class DatasetsResponse(BaseModel):
    """Every stored dataset, by name."""

    datasets: list[DatasetSummary]
