"""Events in and out: POST /v1/events (scope events:write), GET /v1/users/{user_id}/events and
DELETE /v1/users/{user_id} (scope users; each request leaves one audit line, see ui.api.middleware)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from agent.domain.schemas import NoNul, Stripped
from ui.api.deps import EVENTS_WRITE, USERS, WITH_404, Api, Service
from ui.api.errors import ERROR_RESPONSES
from ui.api.schemas import DatasetName, DeleteResponse, IngestRequest, IngestResponse, UserEvents

router = APIRouter(tags=["events"])
UserPath = Annotated[str, Stripped, Path(min_length=1, max_length=256), NoNul]
DatasetQuery = Annotated[DatasetName, Query()]


@router.post("/v1/events", response_model=IngestResponse, dependencies=EVENTS_WRITE, responses=ERROR_RESPONSES)
async def ingest_events(body: IngestRequest, api: Api, svc: Service) -> IngestResponse:
    """Batch ingest. Each event is validated on its own: good ones are stored (committed to
    SQLite before this response), bad ones come back in `errors`. Idempotent by `event_id`
    (client-given, or a content hash). 422 when no event is valid, or when `dataset` does not
    exist (`unknown_dataset`; the message lists the datasets): send `"create": true` to start a
    new dataset, or load a file with `shoplens ingest --events FILE --name NAME`. The batch's
    users join (or change in) the loaded similar-user index, co-visitation and popularity
    before this response; /readyz `index_updates` reports them."""
    api.check_events(len(body.events))
    out = await svc.ingest_events(body.dataset, body.events, create=body.create,
                                  max_text_chars=api.settings.max_text_chars)
    api.metrics.events_ingested.labels("stored").inc(out.stored)
    api.metrics.events_ingested.labels("duplicate").inc(out.duplicates)
    api.metrics.events_ingested.labels("rejected").inc(out.rejected)
    return IngestResponse(**dict(out))


@router.get("/v1/users/{user_id:path}/events", response_model=UserEvents, dependencies=USERS, responses=WITH_404)
async def user_events(
    user_id: UserPath, dataset: DatasetQuery, svc: Service,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
) -> UserEvents:
    """Export a user's stored events, oldest first (review text as stored: masked)."""
    return UserEvents(**dict(await svc.user_events(dataset, user_id, offset=offset, limit=limit)))


@router.delete("/v1/users/{user_id:path}", response_model=DeleteResponse, dependencies=USERS, responses=WITH_404)
async def delete_user(user_id: UserPath, dataset: DatasetQuery, svc: Service) -> DeleteResponse:
    """Delete a user's events and remove the user from the retrieval indexes (user index,
    similar-user lists, their counts in co-visitation and popularity), saved to disk."""
    n = await svc.forget_user(dataset, user_id)
    return DeleteResponse(dataset=dataset, user_id=user_id, deleted_events=n)
