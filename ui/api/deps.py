"""What the routes share, as FastAPI dependencies: the one service facade, the API's context
(settings, metrics, the model holder), the key check per scope (PREDICT, EVENTS_WRITE, USERS,
OPERATOR; USERS also marks the request for the audit line)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security

from agent.app.model_holder import ModelHolder
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from ui.api.config import ApiSettings
from ui.api.errors import ERROR_RESPONSES, ApiError, ErrorEnvelope
from ui.api.metrics import Metrics
from ui.api.security import Authenticator, RateLimiter, require_key


@dataclass
class ApiContext:
    """One app's shared objects (on `app.state.api`)."""

    runtime: Runtime
    settings: ApiSettings
    metrics: Metrics
    auth: Authenticator
    limiter: RateLimiter
    holder: ModelHolder
    service: ShopLensService

    def count(self, route: str, pred: Any) -> None:
        """Count a degraded answer in ``shoplens_degraded_answers_total{route}`` and its salvaged
        model replies in ``shoplens_salvaged_replies_total{route}``."""
        if pred.meta.degraded:
            self.metrics.degraded.labels(route).inc()
        salvaged = getattr(pred.meta, "salvaged", 0)  # a sentiment batch's meta has none
        if salvaged:
            self.metrics.salvaged.labels(route).inc(salvaged)

    def check_events(self, n: int, texts: Iterable[str | None] = ()) -> None:
        """The request-size limits of an event list (413s).

        Raises:
            ApiError: 413 too many events, or a review text too long.
        """
        s = self.settings
        if n > s.max_events_per_request:
            raise ApiError(413, f"{n} events exceed the limit of {s.max_events_per_request} per request "
                           "(SHOPLENS_MAX_EVENTS_PER_REQUEST)", code="too_many_events", param="events")
        for i, t in enumerate(texts):
            if t and len(t) > s.max_text_chars:
                raise ApiError(413, f"review_text of {len(t)} characters exceeds {s.max_text_chars} "
                               "(SHOPLENS_MAX_TEXT_CHARS)", code="text_too_long", param=f"events[{i}].review_text")


def get_api(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.api
    return ctx


def get_service(request: Request) -> ShopLensService:
    ctx: ApiContext = request.app.state.api
    return ctx.service


Api = Annotated[ApiContext, Depends(get_api)]
Service = Annotated[ShopLensService, Depends(get_service)]


def audit_user_access(request: Request) -> None:
    """Mark a request to a user's data for the audit line `ui.api.middleware` writes when it
    ends (with its status, so refused and failed requests are audited too): the user's stored
    id (pseudonymised when SHOPLENS_PSEUDONYMISE_KEY is set), dataset and action."""
    ctx: ApiContext = request.app.state.api
    user_id = str(request.path_params.get("user_id", ""))
    request.state.audit = {"action": "delete" if request.method == "DELETE" else "read",
                           "user_id": ctx.service.stored_id(user_id) if user_id else None,
                           "dataset": request.query_params.get("dataset")}


# One scope per route (docs/api.md#scopes). The audit mark comes before the key check, so a
# request refused for its key is audited too.
PREDICT = [Security(require_key, scopes=["predict"])]
EVENTS_WRITE = [Security(require_key, scopes=["events:write"])]
USERS = [Depends(audit_user_access), Security(require_key, scopes=["users"])]
OPERATOR = [Security(require_key, scopes=["operator"])]

R404: dict[int | str, dict[str, Any]] = {404: {"model": ErrorEnvelope, "description": "unknown user (or dataset)"}}
R503: dict[int | str, dict[str, Any]] = {503: {"model": ErrorEnvelope, "description": "not ready (see Retry-After)"}}
R503_MODEL: dict[int | str, dict[str, Any]] = {503: {
    "model": ErrorEnvelope, "description": "the model is unavailable and this task has no fallback (see Retry-After)"}}
WITH_404 = {**ERROR_RESPONSES, **R404}
