"""/healthz, /readyz (public) and /metrics (operator keys only)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ui.api.deps import OPERATOR, R503, Api, Service
from ui.api.errors import ERROR_RESPONSES
from ui.api.schemas import Health, Readiness

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (no key needed)."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses=R503)
async def readyz(api: Api, svc: Service) -> Any:
    """Ready: the model answered a real 1-token completion (cached a few seconds), the startup
    warm-up has loaded the datasets stored at start, and some dataset can serve; `indexes` names
    each dataset's state (a dataset created since is ``not built`` until its first request
    builds it, and keeps no other dataset from serving). No key needed; 503 says why not."""
    ok, why = await api.holder.probe()
    idx, pending = await asyncio.to_thread(svc.readiness)
    problems = ([] if ok else [f"model: {why}"]) + pending
    if problems:
        return JSONResponse(
            {"error": {"message": "not ready: " + "; ".join(problems), "type": "service_unavailable",
                       "param": None, "code": "not_ready"}},
            status_code=503, headers={"Retry-After": str(api.settings.retry_after_s)})
    return Readiness(ready=True, model={"state": api.holder.state, "probe": why, "restarts": api.holder.restarts},
                     indexes=idx)


@router.get("/metrics", dependencies=OPERATOR, responses=ERROR_RESPONSES, response_class=Response)
async def metrics(api: Api) -> Response:
    """Prometheus metrics (text format). Needs an operator key (SHOPLENS_OPERATOR_KEYS); a
    client key gets 403."""
    return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)
