"""/healthz, /readyz (public) and /metrics (operator keys only)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ui.api.deps import OPERATOR, R503, Api, Service
from ui.api.errors import ERROR_RESPONSES, ApiError
from ui.api.schemas import Health, Readiness
from ui.api.security import Authenticator, bearer_scheme

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (no key needed)."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses=R503)
async def readyz(api: Api, svc: Service,
                 creds: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> Any:  # noqa: B008
    """Ready: the model answered a real 1-token completion (cached a few seconds), the startup
    warm-up has loaded the datasets stored at start, and some dataset can serve. No key needed;
    503 says why not. `indexes_by_state` counts the datasets per index state; with a known API
    key, `indexes` also names each dataset's state (a dataset created since is ``not built``
    until its first request builds it, and keeps no other dataset from serving), and
    `index_updates` how current each loaded dataset's user-side indexes are (users indexed and
    pending, the last update, co-visitation changes not yet saved and the save bound). Without
    one, no dataset name is shown, in the body or the 503 reason."""
    ok, why = await api.holder.probe()
    idx, pending = await asyncio.to_thread(svc.readiness)
    problems = ([] if ok else [f"model: {why}"]) + pending
    named = _known_key(api.auth, creds)
    if not named:
        problems = [_unnamed(p, idx, svc) for p in problems]
    if problems:
        return JSONResponse(
            {"error": {"message": "not ready: " + "; ".join(problems), "type": "service_unavailable",
                       "param": None, "code": "not_ready"}},
            status_code=503, headers={"Retry-After": str(api.settings.retry_after_s)})
    return Readiness(ready=True, model={"state": api.holder.state, "probe": why, "restarts": api.holder.restarts},
                     indexes=idx if named else {}, indexes_by_state=dict(Counter(_state(v) for v in idx.values())),
                     names_hidden=not named, index_updates=svc.index_updates() if named else {})


def _known_key(auth: Authenticator, creds: HTTPAuthorizationCredentials | None) -> bool:
    """Whether the request carries a key this server knows (any scope), or runs without keys."""
    if auth.allow_anonymous:
        return True
    try:
        auth.identify(creds.credentials if creds else None)
    except ApiError:
        return False
    return True


def _state(v: str) -> str:
    """'failed: RuntimeError: ...' -> 'failed' (a state without its detail)."""
    return v.split(":", 1)[0]


def _unnamed(problem: str, idx: dict[str, str], svc: Any) -> str:
    """`problem` with every dataset name replaced by ``<dataset>`` (names and error details can
    tell a stranger whose shops this serves)."""
    for name in sorted(set(idx) | set(svc.state.warming), key=len, reverse=True):
        problem = problem.replace(name, "<dataset>")
    return problem


@router.get("/metrics", dependencies=OPERATOR, responses=ERROR_RESPONSES, response_class=Response)
async def metrics(api: Api) -> Response:
    """Prometheus metrics (text format). Needs an operator key (SHOPLENS_OPERATOR_KEYS); a
    client key gets 403."""
    return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)
