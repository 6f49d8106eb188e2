"""GET /v1/datasets."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from ui.api.deps import PREDICT, Service
from ui.api.errors import ERROR_RESPONSES
from ui.api.schemas import DatasetsResponse

router = APIRouter(tags=["datasets"])


@router.get("/v1/datasets", response_model=DatasetsResponse, dependencies=PREDICT, responses=ERROR_RESPONSES)
async def datasets(svc: Service) -> DatasetsResponse:
    """Every stored dataset: users, items, events, whether its indexes are ready, and the
    embedder they were (or would be) built with. The same summary as `shoplens datasets --json`."""
    return DatasetsResponse(datasets=await asyncio.to_thread(svc.datasets))
