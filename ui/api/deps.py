"""What the routes share, as FastAPI dependencies: the one service facade, the API's context
(settings, metrics, the model holder) and the two key checks (client keys; operator keys)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from agent.app.model_holder import ModelHolder
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from ui.api.config import ApiSettings
from ui.api.errors import ERROR_RESPONSES, ApiError, ErrorEnvelope
from ui.api.metrics import Metrics
from ui.api.security import Authenticator, RateLimiter, require_key, require_operator


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
CLIENT = [Depends(require_key)]
OPERATOR = [Depends(require_operator)]

R404: dict[int | str, dict[str, Any]] = {404: {"model": ErrorEnvelope, "description": "unknown user (or dataset)"}}
R503: dict[int | str, dict[str, Any]] = {503: {"model": ErrorEnvelope, "description": "not ready (see Retry-After)"}}
R503_MODEL: dict[int | str, dict[str, Any]] = {503: {
    "model": ErrorEnvelope, "description": "the model is unavailable and this task has no fallback (see Retry-After)"}}
WITH_404 = {**ERROR_RESPONSES, **R404}
