"""POST /v1/next-item."""

from __future__ import annotations

from fastapi import APIRouter

from agent.app.events import parse_as_of
from agent.domain.predictions import NextItemPrediction
from ui.api.deps import CLIENT, WITH_404, Api, Service
from ui.api.schemas import NextItemRequest

router = APIRouter(tags=["tasks"])


@router.post("/v1/next-item", response_model=NextItemPrediction, dependencies=CLIENT, responses=WITH_404)
async def next_item(body: NextItemRequest, api: Api, svc: Service) -> NextItemPrediction:
    """Top-k next items, each with a reason citing the user's own events.

    When the model is slow, down or loading the answer comes from retrieval fusion with
    `meta.degraded=true` and the reason."""
    if body.events is not None:
        api.check_events(len(body.events), (e.review_text for e in body.events))
    when = parse_as_of(body.as_of)
    k = min(body.k, len(body.candidates)) if body.candidates else body.k
    cfg = svc.next_item_config(k=k, repurchase=body.repurchase, use_model=body.use_llm)
    pred = await svc.next_item(body.dataset, body.user_id, events=body.events, config=cfg, as_of=when,
                               use_model=body.use_llm, candidates=body.candidates)
    api.count("/v1/next-item", pred)
    return pred
