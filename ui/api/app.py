"""The FastAPI app: routes validate, call `ShopLensService`, and render. Nothing runs at import.

`create_app(runtime, settings)` builds the app; its lifespan starts the model and loads every
dataset's indexes in the background, so the server answers (degraded) while they load.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from agent.next_item import NextItemConfig
from agent.pii import mask_pii, pseudonymise
from agent.predictions import NextItemPrediction
from agent.runtime import Runtime
from agent.schemas import BehaviorEvent, parse_timestamp
from agent.service import ShopLensService
from agent.store import UnknownUserError
from ui.api.config import ApiSettings
from ui.api.errors import (
    ERROR_RESPONSES,
    ApiError,
    ErrorEnvelope,
    describe_errors,
    install_error_handlers,
)
from ui.api.metrics import Metrics
from ui.api.middleware import ApiMiddleware
from ui.api.model import ModelHolder
from ui.api.schemas import (
    DatasetName,
    DeleteResponse,
    EventError,
    Health,
    IngestRequest,
    IngestResponse,
    NextItemRequest,
    Readiness,
    UserEvents,
    guard_timestamp,
    out_of_range_timestamp,
)
from ui.api.security import Authenticator, RateLimiter, require_key

log = logging.getLogger("shoplens.api")

UserPath = Annotated[str, Path(min_length=1, max_length=256)]
DatasetQuery = Annotated[DatasetName, Query()]
_404 = {404: {"model": ErrorEnvelope, "description": "unknown user (or dataset)"}}
_503 = {503: {"model": ErrorEnvelope, "description": "not ready (see Retry-After)"}}


class ApiState:
    """What the routes share: the runtime, the guarded model, limits, locks and metrics."""

    def __init__(self, runtime: Runtime, settings: ApiSettings):
        self.runtime = runtime
        self.settings = settings
        self.metrics = Metrics()
        self.auth = Authenticator(settings)
        self.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
        self.model = ModelHolder(runtime, settings, self.metrics)
        self.write_lock = asyncio.Lock()  # one writer at a time: ingest order and deletes stay simple
        self._index_locks: dict[str, asyncio.Lock] = {}
        self.indexes: dict[str, str] = {}  # dataset -> "loading" | "ready" | "unusable: ..."
        key = settings.pseudonymise_key
        self._pkey = key.get_secret_value().encode() if key and key.get_secret_value() else None

    def service(self, *, use_model: bool = True) -> ShopLensService:
        return ShopLensService(self.runtime, use_model=use_model, model_provider=self.model.get)

    def stored_id(self, user_id: str) -> str:
        """The id the store holds for a caller's user id (pseudonymised when configured)."""
        return pseudonymise(user_id, self._pkey) if self._pkey else user_id

    async def ensure_indexes(self, dataset: str) -> None:
        """Load (or build) a dataset's artifacts once, off the event loop.

        Raises:
            ApiError: 422 unknown dataset, or a dataset without a catalogue.
        """
        if self.indexes.get(dataset) == "ready":
            return
        datasets = await asyncio.to_thread(self.runtime.store.datasets)
        if dataset not in datasets:
            raise ApiError(422, f"unknown dataset {dataset!r}; ingested: {datasets}", code="unknown_dataset",
                           param="dataset")
        lock = self._index_locks.setdefault(dataset, asyncio.Lock())
        async with lock:
            if self.indexes.get(dataset) == "ready":
                return
            self.indexes[dataset] = "loading"
            try:
                await asyncio.to_thread(self.runtime.artifacts, dataset)
            except ValueError as e:
                self.indexes[dataset] = f"unusable: {e}"
                raise ApiError(422, str(e), code="dataset_unusable", param="dataset") from e
            except Exception as e:
                self.indexes[dataset] = f"failed: {type(e).__name__}: {e}"
                raise
            self.indexes[dataset] = "ready"

    async def warm_up(self) -> None:
        for d in await asyncio.to_thread(self.runtime.store.datasets):
            try:
                await self.ensure_indexes(d)
            except Exception as e:  # recorded in self.indexes and reported by /readyz
                log.warning("indexes for %s not loaded: %s", d, e)


def create_app(runtime: Runtime, settings: ApiSettings | None = None) -> FastAPI:
    """The ShopLens HTTP API over one `Runtime` (which the app closes at shutdown)."""
    settings = settings or ApiSettings()
    state = ApiState(runtime, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if not state.auth.hashes and not state.auth.allow_anonymous:
            log.warning("no API keys configured: every protected route answers 401 (set SHOPLENS_API_KEYS)")
        state.model.start()
        warm = asyncio.create_task(state.warm_up(), name="shoplens-warm-indexes")
        try:
            yield
        finally:
            warm.cancel()
            await state.model.aclose()
            await runtime.aclose()

    app = FastAPI(
        title="ShopLens API",
        version="1",
        summary="Behaviour sequences in, validated and explained e-commerce predictions out.",
        lifespan=lifespan,
        docs_url="/docs" if settings.public_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.public_docs else None,
    )
    app.state.api = state
    install_error_handlers(app)
    app.add_middleware(ApiMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes)
    _routes(app, state)
    return app


def _routes(app: FastAPI, state: ApiState) -> None:
    s = state.settings
    auth = [Depends(require_key)]

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        """The process is alive (no key needed)."""
        return Health()

    @app.get("/readyz", response_model=Readiness, responses=_503, tags=["ops"])
    async def readyz() -> Any:
        """Ready: the model answered a real 1-token completion (cached a few seconds) and every
        dataset with a catalogue has its indexes loaded. No key needed; 503 says why not."""
        ok, why = await state.model.probe()
        stored = await asyncio.to_thread(state.runtime.store.datasets)
        idx = {d: "not loaded" for d in stored} | state.indexes
        pending = [d for d, v in idx.items() if v in ("loading", "not loaded") or v.startswith("failed")]
        problems = ([] if ok else [f"model: {why}"]) + [f"indexes {d}: {idx[d]}" for d in pending]
        if problems:
            return JSONResponse(
                {"error": {"message": "not ready: " + "; ".join(problems), "type": "service_unavailable",
                           "param": None, "code": "not_ready"}},
                status_code=503, headers={"Retry-After": str(s.retry_after_s)})
        return Readiness(ready=True, model={"state": state.model.state, "probe": why}, indexes=idx)

    @app.get("/metrics", dependencies=auth, responses=ERROR_RESPONSES, tags=["ops"],
             response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics (text format)."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/next-item", response_model=NextItemPrediction, dependencies=auth,
              responses={**ERROR_RESPONSES, **_404}, tags=["tasks"])
    async def next_item(body: NextItemRequest) -> NextItemPrediction:
        """Top-k next items, each with a reason citing the user's own events.

        When the model is slow, down or loading the answer comes from retrieval fusion with
        `meta.degraded=true` and the reason."""
        events = body.events
        if events is not None:
            _check_event_limits(len(events), (e.review_text for e in events), s)
            if state._pkey:
                events = [e.model_copy(update={"user_id": state.stored_id(e.user_id)}) for e in events]
        as_of = _parse_as_of(body.as_of)
        uid = state.stored_id(body.user_id)
        await state.ensure_indexes(body.dataset)
        cfg = NextItemConfig(
            k=body.k, repurchase=body.repurchase, use_llm_ranking=body.use_llm, explain=body.use_llm,
            n_candidates=max(state.runtime.settings.n_candidates, body.k),
            permutations=state.runtime.settings.permutations, window=state.runtime.settings.history_window,
            max_attempts=state.runtime.settings.llm_max_attempts,
        )
        try:
            try:
                async with asyncio.timeout(s.request_timeout_s):
                    pred = await state.service(use_model=body.use_llm).next_item(
                        body.dataset, uid, events=events, config=cfg, as_of=as_of)
            except TimeoutError:
                pred = await state.service(use_model=False).next_item(
                    body.dataset, uid, events=events, as_of=as_of,
                    config=replace(cfg, use_llm_ranking=False, explain=False))
                pred.meta.degraded = True
                pred.meta.degraded_reason = (f"model did not answer within {s.request_timeout_s:g} s; "
                                             "ranked by retrieval fusion only")
        except UnknownUserError as e:
            raise _unknown_user(e, body.user_id, pseudonymised=state._pkey is not None) from e
        if pred.meta.degraded:
            state.metrics.degraded.labels("/v1/next-item").inc()
        pred.user_id = body.user_id
        return pred

    @app.post("/v1/events", response_model=IngestResponse, dependencies=auth, responses=ERROR_RESPONSES,
              tags=["events"])
    async def ingest_events(body: IngestRequest) -> IngestResponse:
        """Batch ingest. Each event is validated on its own: good ones are stored (committed to
        SQLite before this response), bad ones come back in `errors`. Idempotent by `event_id`
        (client-given, or a content hash). 422 only when no event is valid."""
        _check_event_limits(len(body.events), (), s)
        good: list[BehaviorEvent] = []
        errors: list[EventError] = []
        for i, raw in enumerate(body.events):
            ev, errs = _validate_event(raw, i, state)
            if ev is not None:
                good.append(ev)
            errors.extend(errs)
        if not good:
            first = errors[0]
            raise ApiError(422, f"no valid events; {len(errors)} errors, first: {first.param}: {first.message}",
                           code=first.code, param=first.param)
        async with state.write_lock:
            stored = await asyncio.to_thread(state.runtime.store.add_events, body.dataset, good)
        state.metrics.events_ingested.labels("stored").inc(stored)
        state.metrics.events_ingested.labels("duplicate").inc(len(good) - stored)
        state.metrics.events_ingested.labels("rejected").inc(len(body.events) - len(good))
        return IngestResponse(dataset=body.dataset, received=len(body.events), stored=stored,
                              duplicates=len(good) - stored, rejected=len(body.events) - len(good),
                              event_ids=[e.event_id for e in good], errors=errors)

    @app.get("/v1/users/{user_id}/events", response_model=UserEvents, dependencies=auth,
             responses={**ERROR_RESPONSES, **_404}, tags=["events"])
    async def user_events(
        user_id: UserPath, dataset: DatasetQuery,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
    ) -> UserEvents:
        """Export a user's stored events, oldest first (review text as stored: masked)."""
        try:
            evs = await asyncio.to_thread(state.runtime.store.user_events, dataset, state.stored_id(user_id))
        except UnknownUserError as e:
            raise _unknown_user(e, user_id, pseudonymised=state._pkey is not None) from e
        page = evs[offset: offset + limit]
        if state._pkey:
            page = [e.model_copy(update={"user_id": user_id}) for e in page]
        return UserEvents(dataset=dataset, user_id=user_id, total=len(evs), offset=offset, events=page)

    @app.delete("/v1/users/{user_id}", response_model=DeleteResponse, dependencies=auth,
                responses={**ERROR_RESPONSES, **_404}, tags=["events"])
    async def delete_user(user_id: UserPath, dataset: DatasetQuery) -> DeleteResponse:
        """Delete a user's events and remove the user from the retrieval indexes (user index,
        similar-user lists, refitted co-visitation and popularity), saved to disk."""
        svc = state.service(use_model=False)
        lock = state._index_locks.setdefault(dataset, asyncio.Lock())
        try:
            async with state.write_lock, lock:
                n = await asyncio.to_thread(svc.forget_user, dataset, state.stored_id(user_id))
        except UnknownUserError as e:
            raise ApiError(404, f"no user {user_id!r} in dataset {dataset!r}", code="unknown_user",
                           param="user_id") from e
        return DeleteResponse(dataset=dataset, user_id=user_id, deleted_events=n)


def _check_event_limits(n: int, texts: Any, s: ApiSettings) -> None:
    if n > s.max_events_per_request:
        raise ApiError(413, f"{n} events exceed the limit of {s.max_events_per_request} per request "
                       "(SHOPLENS_MAX_EVENTS_PER_REQUEST)", code="too_many_events", param="events")
    for i, t in enumerate(texts):
        if t and len(t) > s.max_text_chars:
            raise ApiError(413, f"review_text of {len(t)} characters exceeds {s.max_text_chars} "
                           "(SHOPLENS_MAX_TEXT_CHARS)", code="text_too_long", param=f"events[{i}].review_text")


def _validate_event(raw: dict[str, Any], i: int, state: ApiState) -> tuple[BehaviorEvent | None, list[EventError]]:
    """One raw event -> the event to store (pseudonymised, masked, id from the stored content)."""
    s = state.settings
    text = raw.get("review_text")
    if isinstance(text, str) and len(text) > s.max_text_chars:
        return None, [EventError(index=i, param=f"events[{i}].review_text", code="text_too_long",
                                 message=f"{len(text)} characters exceed {s.max_text_chars}")]
    try:
        ev = BehaviorEvent.model_validate(guard_timestamp(raw))
        changes: dict[str, Any] = {}
        if state._pkey:
            changes["user_id"] = state.stored_id(ev.user_id)
        if s.mask_pii and ev.review_text:
            masked = mask_pii(ev.review_text)
            if masked != ev.review_text:
                changes["review_text"] = masked
        if changes:
            # The content hash is recomputed over what is stored, so it never encodes a raw id.
            data = ev.model_dump() | changes | {"event_id": raw.get("event_id") or ""}
            ev = BehaviorEvent.model_validate(data)
    except ValidationError as e:
        return None, [EventError(index=i, **d) for d in describe_errors(e.errors(), ("events", i))]
    return ev, []


def _parse_as_of(value: str | int | float | None) -> datetime | None:
    if value is None:
        return None
    if out_of_range_timestamp(value):
        raise ApiError(422, f"as_of: timestamp {value!r} is out of range", code="invalid_timestamp",
                       param="as_of")
    try:
        return parse_timestamp(value)
    except ValueError as e:
        raise ApiError(422, f"as_of: {e}", code="invalid_timestamp", param="as_of") from e


def _unknown_user(e: UnknownUserError, raw_id: str, *, pseudonymised: bool) -> ApiError:
    hint = "" if pseudonymised or not e.suggestions else f"; did you mean {', '.join(e.suggestions)}?"
    return ApiError(404, f"no user {raw_id!r} in dataset {e.dataset!r}{hint} (or send the user's "
                    "events inline)", code="unknown_user", param="user_id")
