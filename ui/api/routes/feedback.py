"""Recommendation feedback: POST /v1/feedback (scope events:write), GET /v1/feedback/report (scope operator).

Every next-item answer carries a `recommendation_id`; clients report what the user saw
(impressions), clicked and bought against it. Each event is counted in
``shoplens_feedback_total{kind, stage}`` at /metrics.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from agent.app.events import out_of_range_timestamp
from agent.app.feedback import FeedbackKind, FeedbackReport, Stage
from agent.domain.errors import RequestError
from agent.domain.schemas import parse_timestamp
from ui.api.deps import EVENTS_WRITE, OPERATOR, Api, Service
from ui.api.errors import ERROR_RESPONSES
from ui.api.schemas import DatasetName, ItemId, not_a_boolean

router = APIRouter(tags=["feedback"])

RecommendationId = Annotated[str, Field(min_length=1, max_length=64, examples=["3f2b9c0d5e7a4b1c9d8e6f5a4b3c2d1e"],
                                        description="the `recommendation_id` of a POST /v1/next-item answer")]
When = Annotated[
    str | int | float | None,
    BeforeValidator(not_a_boolean),
    WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}, {"type": "null"}],
                    "description": "when it happened (ISO-8601 or unix s/ms); default: when it arrives"}),
]


class FeedbackRequest(BaseModel):
    """One thing a user did with a recommended item."""

    model_config = ConfigDict(extra="forbid")

    recommendation_id: RecommendationId
    item_id: ItemId
    kind: FeedbackKind = Field(description="impression: the item was on screen; click; purchase")
    timestamp: When = None


class FeedbackResponse(BaseModel):
    recommendation_id: str
    item_id: str
    kind: FeedbackKind
    position: int = Field(ge=1, description="1-based position of the item in the list shown")
    stage: Stage = Field(description="how that list was made: fast (no model), refined (LLM-ranked), "
                                     "explained (LLM-ranked with reasons) or precomputed")


def _unix_seconds(value: str | int | float | None) -> float | None:
    """The request's timestamp as unix seconds (None stays None).

    Raises:
        RequestError: unparseable or out of range (param ``timestamp``, code ``invalid_timestamp``).
    """
    if value is None:
        return None
    if out_of_range_timestamp(value):
        raise RequestError(f"timestamp {value!r} is out of range: send unix seconds, milliseconds or ISO-8601",
                           code="invalid_timestamp", param="timestamp")
    try:
        return parse_timestamp(value).timestamp()
    except ValueError as e:
        raise RequestError(f"timestamp: {e}", code="invalid_timestamp", param="timestamp") from e


@router.post("/v1/feedback", response_model=FeedbackResponse, dependencies=EVENTS_WRITE, responses=ERROR_RESPONSES)
async def feedback(body: FeedbackRequest, api: Api, svc: Service) -> FeedbackResponse:
    """Record an impression, click or purchase of an item a recommendation showed.

    Counts against the list the recommendation showed last (a progressive answer upgraded from
    fast to refined counts at its refined position). Log impressions too: the report's
    click-through counts only logged impressions. 422 when the id is unknown or the item was not
    shown (`param` names the field)."""
    event = await svc.record_feedback_event(body.recommendation_id, body.item_id, body.kind,
                                            _unix_seconds(body.timestamp))
    api.metrics.feedback.labels(event.kind, event.stage).inc()
    return FeedbackResponse(recommendation_id=event.recommendation_id, item_id=event.item_id, kind=event.kind,
                            position=event.position, stage=event.stage)


@router.get("/v1/feedback/report", response_model=FeedbackReport, dependencies=OPERATOR,
            responses=ERROR_RESPONSES)
async def feedback_report(svc: Service, dataset: Annotated[DatasetName | None, Query()] = None) -> FeedbackReport:
    """Click-through of what was shown, overall and by answer stage: impressions, clicks,
    purchases, CTR with its 95% Wilson interval, and CTR by shown position. Needs the operator scope.
    The same report as `shoplens eval feedback --json`."""
    return await asyncio.to_thread(svc.feedback_report, dataset)


__all__ = ["FeedbackRequest", "FeedbackResponse", "router"]
