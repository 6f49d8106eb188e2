"""Next-item: POST /v1/next-item (blocking, progressive or stored), POST /v1/next-item/batch (many
users), GET /v1/next-item/{id} (poll) and GET /v1/next-item/{id}/events (Server-Sent Events: each
stage, then each model reason, then done)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query
from sse_starlette import EventSourceResponse

from agent.app.answers import NextItemBatch, StoredAnswer
from agent.app.events import parse_as_of
from agent.app.progressive import NextItemAnswer
from ui.api.deps import PREDICT, WITH_404, Api, Service
from ui.api.errors import ApiError
from ui.api.schemas import NextItemBatchRequest, NextItemRequest

router = APIRouter(tags=["tasks"])
RecId = Annotated[str, Path(min_length=1, max_length=64, description="the answer's recommendation_id")]


@router.post("/v1/next-item", response_model=StoredAnswer | NextItemAnswer, dependencies=PREDICT,
             responses=WITH_404)
async def next_item(body: NextItemRequest, api: Api, svc: Service) -> NextItemAnswer:
    """Top-k next items, each with a reason citing the user's own events.

    Without `wait_s`: the whole explained answer; when the model is slow, down or loading it comes
    from retrieval fusion with `meta.degraded=true` and the reason. With `wait_s`: the served
    pipeline without the model at once (or the model's refinement if it is ready within `wait_s`),
    `refinement.state` says whether the model is still working. With `stored`: the precomputed
    answer when there is one (`computed_at`, `stale`), else as without it."""
    if body.events is not None:
        api.check_events(len(body.events), (e.review_text for e in body.events))
    plain = body.events is None and body.candidates is None and body.as_of is None and not body.repurchase
    if body.stored and plain:
        stored = await svc.stored_next_item(body.dataset, body.user_id, body.k)
        if stored is not None:
            api.count("/v1/next-item", stored)
            return stored
    when = parse_as_of(body.as_of)
    k = min(body.k, len(body.candidates)) if body.candidates else body.k
    if body.wait_s is not None:
        ans = await svc.next_item_progressive(body.dataset, body.user_id, events=body.events, k=k,
                                              repurchase=body.repurchase, as_of=when, candidates=body.candidates,
                                              use_model=body.use_llm, wait_s=body.wait_s)
        api.count("/v1/next-item", ans)
        return ans
    cfg = svc.next_item_config(k=k, repurchase=body.repurchase, use_model=body.use_llm)
    pred = await svc.next_item(body.dataset, body.user_id, events=body.events, config=cfg, as_of=when,
                               use_model=body.use_llm, candidates=body.candidates)
    api.count("/v1/next-item", pred)
    return svc.answered(body.dataset, body.user_id, pred, asked_model=body.use_llm)


@router.post("/v1/next-item/batch", response_model=NextItemBatch, dependencies=PREDICT, responses=WITH_404)
async def next_item_batch(body: NextItemBatchRequest, api: Api, svc: Service) -> NextItemBatch:
    """Top-k next items for many stored users: each user's precomputed answer when `stored` and
    there is one (milliseconds), else the served pipeline now (without the model unless
    `use_llm`). `answers` are in request order; a user that cannot be answered (e.g. unknown) is
    in `errors` with its code, and the others are still answered. The whole request fails only
    for an unknown dataset (422 `unknown_dataset`) or above SHOPLENS_MAX_BATCH_USERS users (413)."""
    limit = api.settings.max_batch_users
    if len(body.user_ids) > limit:
        raise ApiError(413, f"{len(body.user_ids)} users exceed the limit of {limit} per batch "
                       "(SHOPLENS_MAX_BATCH_USERS)", code="too_many_users", param="user_ids")
    out = await svc.next_item_batch(body.dataset, body.user_ids, k=body.k, use_model=body.use_llm,
                                    stored=body.stored)
    for ans in out.answers:
        api.count("/v1/next-item/batch", ans)
    return out


@router.get("/v1/next-item/{recommendation_id}", response_model=NextItemAnswer, dependencies=PREDICT,
            responses=WITH_404)
async def next_item_poll(
    recommendation_id: RecId, svc: Service,
    wait_s: Annotated[float, Query(ge=0, le=60, description="long poll: wait up to this many seconds "
                                   "for the refinement to finish")] = 0.0,
) -> NextItemAnswer:
    """The latest stage of a progressive answer (fast, refined, explained) and the refinement's
    state. 404 for an id this server never gave out or has forgotten (after an hour)."""
    job = svc.progressive.get(recommendation_id)
    if wait_s > 0 and not job.finished:
        await job.wait(wait_s)
    return job.snapshot()


@router.get("/v1/next-item/{recommendation_id}/events", dependencies=PREDICT, responses=WITH_404,
            response_class=EventSourceResponse)
async def next_item_events(recommendation_id: RecId, svc: Service) -> EventSourceResponse:
    """Server-Sent Events: `fast`, `refined` and `explained` (each the whole answer at that stage,
    as JSON, the stages already reached first), one `reason` per model-written reason once the
    explanation is validated, then `done` (the refinement's final state); the stream then closes."""
    job = svc.progressive.get(recommendation_id)

    async def events() -> AsyncIterator[dict[str, str]]:
        async for stage, pred in job.follow():
            yield {"event": stage, "id": stage, "data": job.snapshot(stage).model_dump_json()}
            if stage == "explained":
                for it in pred.items:
                    if it.reason_source == "model":
                        yield {"event": "reason", "data": json.dumps({
                            "rank": it.rank, "item_id": it.item_id, "title": it.title, "reason": it.reason,
                            "evidence": [e.model_dump() for e in it.evidence]}, ensure_ascii=False)}
        yield {"event": "done", "data": job.snapshot().refinement.model_dump_json()}

    return EventSourceResponse(events(), ping=15)
