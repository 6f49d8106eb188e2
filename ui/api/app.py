"""The FastAPI app: routes validate, call `ShopLensService`, and render. Nothing runs at import.

`create_app(runtime, settings)` builds the app; its lifespan starts the model and loads every
dataset's indexes in the background, so the server answers (degraded) while they load.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Path, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.app.tasks_service import TasksService, horizon_key, robust_end
from agent.domain.errors import UnknownUserError
from agent.domain.pii import mask_pii, pseudonymise
from agent.domain.predictions import NextItemPrediction
from agent.domain.schemas import BehaviorEvent, parse_timestamp
from agent.llm.base import ChatModel, Completion, Message, ModelUnavailableError
from agent.tasks.audience import AudiencePrediction
from agent.tasks.churn import ChurnPrediction, default_churn_baseline
from agent.tasks.common import LogisticBaseline
from agent.tasks.intent import IntentPrediction, IntentService
from agent.tasks.next_item import NextItemConfig
from agent.tasks.profile import UserProfile
from agent.tasks.sentiment import SentimentAnalyzer, SentimentFailure, SentimentResult
from agent.tasks.session_intent import SessionIntentPrediction, default_session_baseline
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
    AudienceRequest,
    ChurnRequest,
    DatasetName,
    DeleteResponse,
    EventError,
    Health,
    IngestRequest,
    IngestResponse,
    NextItemRequest,
    ProfileRequest,
    PurchaseIntentRequest,
    Readiness,
    SentimentBatchMeta,
    SentimentRequest,
    SentimentResponse,
    SessionIntentRequest,
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
_503_MODEL = {503: {"model": ErrorEnvelope, "description": "the model is unavailable and this task has no "
                    "fallback (see Retry-After)"}}
P = TypeVar("P", IntentPrediction, SessionIntentPrediction, ChurnPrediction, UserProfile, AudiencePrediction)


class ApiTasksService(TasksService):
    """`TasksService` with the API's shared caches, and the task's hand-set prior where a
    dataset has too few (or one-class) labelled rows to fit a baseline."""

    priors: dict[tuple[str, str, str], LogisticBaseline]  # (task, dataset, horizon) -> hand-set prior

    def intent_baseline(self, dataset: str, horizon_h: float = 48.0) -> LogisticBaseline:
        return (self.priors.get(("intent", dataset, horizon_key("intent", horizon_h)))
                or super().intent_baseline(dataset, horizon_h))

    def session_intent_baseline(self, dataset: str, horizon_hours: float | None = None) -> LogisticBaseline:
        return (self.priors.get(("session_intent", dataset, horizon_key("session_intent", horizon_hours)))
                or super().session_intent_baseline(dataset, horizon_hours))

    def churn_baseline(self, dataset: str, horizon_days: int = 90) -> LogisticBaseline:
        return (self.priors.get(("churn", dataset, horizon_key("churn", horizon_days)))
                or super().churn_baseline(dataset, horizon_days))


class ModelWatch:
    """The guarded model for one request, remembering whether it was unavailable.

    The task services turn `ModelUnavailableError` into degraded answers; routes whose task
    has no labelled fallback read `down` to answer 503 instead.
    """

    def __init__(self, holder: ModelHolder):
        self.holder = holder
        self.inner: ChatModel | None = None
        self.model_id = "unavailable"
        self.down: str | None = None
        self.retry_after_s: float | None = None

    def _note(self, e: ModelUnavailableError) -> None:
        self.down = self.down or str(e)
        self.retry_after_s = max(self.retry_after_s or 0.0, e.retry_after_s or 0.0)

    async def get(self) -> ChatModel:
        try:
            self.inner = await self.holder.get()
        except ModelUnavailableError as e:
            self._note(e)
            raise
        self.model_id = self.inner.model_id
        return self

    async def complete(self, messages: list[Message], **kw: Any) -> Completion:
        assert self.inner is not None
        try:
            return await self.inner.complete(messages, **kw)
        except ModelUnavailableError as e:
            self._note(e)
            raise


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

        # Shared by the task services across requests; dropped on ingest and delete.
        self._task_catalogs: dict[str, Any] = {}
        self._task_audience: dict[str, Any] = {}
        self._dataset_end: dict[str, datetime] = {}
        self._priors: dict[tuple[str, str, str], LogisticBaseline] = {}

    def service(self, *, use_model: bool = True) -> ShopLensService:
        return ShopLensService(self.runtime, use_model=use_model, model_provider=self.model.get)

    def tasks(self, watch: ModelWatch | None, *, use_model: bool = True) -> TasksService:
        """Intent, churn, profile and audience, with the guarded model (via `watch`)."""
        svc = ApiTasksService(self.runtime, use_model=use_model and watch is not None)
        if watch is not None:
            svc.model_provider = watch.get
        svc._catalogs, svc._audience = self._task_catalogs, self._task_audience  # caches live here
        svc.priors = self._priors
        return svc

    async def ensure_baseline(self, task: str, dataset: str, horizon_h: float | None = 48.0) -> str | None:
        """Fit (or load) a task's baseline once, off the event loop. A dataset too small to fit
        one gets the service's hand-set prior; the returned note says so (for `meta.notes`)."""
        # one prior per horizon: a horizon the data cannot label must not change the answer at others
        key = (task, dataset, horizon_key(task, horizon_h))
        if key not in self._priors:
            svc = self.tasks(None, use_model=False)
            fits: dict[str, Callable[[], LogisticBaseline]] = {
                "intent": lambda: svc.intent_baseline(dataset, horizon_h or 48.0),
                "session_intent": lambda: svc.session_intent_baseline(dataset, horizon_h),
                "churn": lambda: svc.churn_baseline(dataset, int(horizon_h or 90))}
            priors: dict[str, Callable[[], LogisticBaseline]] = {
                "intent": lambda: IntentService(None).baseline, "session_intent": default_session_baseline,
                "churn": default_churn_baseline}
            try:
                await asyncio.to_thread(fits[task])
                return None
            except ValueError as e:  # sklearn: no rows, or a single class
                log.warning("%s baseline for %s not fitted (%s); using the hand-set prior", task, dataset, e)
                self._priors[key] = priors[task]()
        return (f"{task} baseline: hand-set prior ({dataset!r} has too few labelled rows to fit one)")

    def forget_task_caches(self, dataset: str) -> None:
        """After ingest or delete: the audience index and catalogue are rebuilt on next use."""
        self._task_catalogs.pop(dataset, None)
        self._task_audience.pop(dataset, None)
        self._dataset_end.pop(dataset, None)
        for key in [k for k in self._priors if k[1] == dataset]:
            self._priors.pop(key)

    async def dataset_end(self, dataset: str) -> datetime:
        if dataset not in self._dataset_end:
            self._dataset_end[dataset] = await asyncio.to_thread(robust_end, self.runtime.store, dataset)
        return self._dataset_end[dataset]

    async def check_dataset(self, dataset: str) -> None:
        datasets = await asyncio.to_thread(self.runtime.store.datasets)
        if dataset not in datasets:
            raise ApiError(422, f"unknown dataset {dataset!r}; ingested: {datasets}", code="unknown_dataset",
                           param="dataset")

    async def check_user(self, dataset: str, raw_id: str) -> str:
        """The stored id of a known user. Raises ApiError 422 unknown dataset, 404 unknown user."""
        await self.check_dataset(dataset)
        uid = self.stored_id(raw_id)
        if not await asyncio.to_thread(self.runtime.store.has_user, dataset, uid):
            sugg = [] if self._pkey else await asyncio.to_thread(self.runtime.store.similar_user_ids, dataset, uid)
            raise _unknown_user(UnknownUserError(dataset, uid, sugg), raw_id, pseudonymised=self._pkey is not None)
        return uid

    def model_down(self, watch: ModelWatch, task: str, hint: str) -> ApiError:
        retry = max(self.settings.retry_after_s, math.ceil(watch.retry_after_s or 0))
        return ApiError(503, f"the model is unavailable ({watch.down}); {task} needs it. {hint}",
                        code="model_unavailable", headers={"Retry-After": str(retry)})

    async def run_task(self, route: str, run: Callable[[TasksService], Awaitable[P]], *, use_llm: bool,
                       fallback: bool, task: str = "", hint: str = "") -> P:
        """One task call with the guarded model, bounded by `request_timeout_s`.

        `fallback`: the task has a labelled answer without the model (baseline or retrieval),
        passed through with `meta.degraded=true`; otherwise a missing model is a 503.
        """
        s = self.settings
        watch = ModelWatch(self.model)
        try:
            async with asyncio.timeout(s.request_timeout_s):
                pred = await run(self.tasks(watch, use_model=use_llm))
        except TimeoutError:
            if not fallback:
                watch.down = watch.down or f"no answer within {s.request_timeout_s:g} s"
                raise self.model_down(watch, task, hint) from None
            pred = await run(self.tasks(None, use_model=False))
            pred.meta.degraded = True
            pred.meta.degraded_reason = (f"model did not answer within {s.request_timeout_s:g} s; "
                                         + (pred.meta.degraded_reason or ""))
        if watch.down and use_llm and not fallback:
            raise self.model_down(watch, task, hint)
        if pred.meta.degraded:
            self.metrics.degraded.labels(route).inc()
        return pred

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

    tasks_responses: dict[int | str, dict[str, Any]] = {**ERROR_RESPONSES, **_404}

    @app.post("/v1/purchase-intent", response_model=IntentPrediction, dependencies=auth,
              responses=tasks_responses, tags=["tasks"])
    async def purchase_intent(body: PurchaseIntentRequest) -> IntentPrediction:
        """P(the user buys the item within `horizon_hours`): a logistic baseline on funnel
        features blended with the model's yes/no probability, and a reason citing the user's events.

        Model down, slow or loading: 200 with the baseline probability and a template reason,
        `meta.degraded=true` and the reason."""
        as_of = _parse_as_of(body.as_of)
        uid = await state.check_user(body.dataset, body.user_id)
        note = await state.ensure_baseline("intent", body.dataset, body.horizon_hours)
        pred = await state.run_task("/v1/purchase-intent", lambda svc: svc.intent(
            body.dataset, uid, body.item_id, as_of=as_of, horizon_hours=body.horizon_hours),
            use_llm=body.use_llm, fallback=True)
        pred.meta.notes.extend([note] if note else [])
        pred.user_id = body.user_id
        return pred

    @app.post("/v1/session-intent", response_model=SessionIntentPrediction, dependencies=auth,
              responses=tasks_responses, tags=["tasks"])
    async def session_intent(body: SessionIntentRequest) -> SessionIntentPrediction:
        """P(the user buys anything later in the current session, or within `horizon_hours`): a
        logistic baseline on session features blended with the model's yes/no probability, and a
        reason citing the session's events. A user with no events before `as_of` gets the labelled
        base rate (`cold_start`).

        Model down, slow or loading: 200 with the baseline probability and a template reason,
        `meta.degraded=true` and the reason."""
        as_of = _parse_as_of(body.as_of)
        uid = await state.check_user(body.dataset, body.user_id)
        note = await state.ensure_baseline("session_intent", body.dataset, body.horizon_hours)
        pred = await state.run_task("/v1/session-intent", lambda svc: svc.session_intent(
            body.dataset, uid, as_of=as_of, horizon_hours=body.horizon_hours), use_llm=body.use_llm, fallback=True)
        pred.meta.notes.extend([note] if note else [])
        pred.user_id = body.user_id
        return pred

    @app.post("/v1/churn", response_model=ChurnPrediction, dependencies=auth,
              responses=tasks_responses, tags=["tasks"])
    async def churn(body: ChurnRequest) -> ChurnPrediction:
        """P(no purchase within `horizon_days` after `as_of`): an RFM logistic baseline blended
        with the model, drivers, a retention action and a cited reason.

        Model down, slow or loading: 200 with the baseline probability and a rule-based action,
        `meta.degraded=true` and the reason."""
        uid = await state.check_user(body.dataset, body.user_id)
        as_of = _parse_as_of(body.as_of) or await state.dataset_end(body.dataset)
        note = await state.ensure_baseline("churn", body.dataset, body.horizon_days)
        pred = await state.run_task("/v1/churn", lambda svc: svc.churn(
            body.dataset, uid, as_of=as_of, horizon_days=body.horizon_days),
            use_llm=body.use_llm, fallback=True)
        pred.meta.notes.extend([note] if note else [])
        pred.user_id = body.user_id
        return pred

    @app.post("/v1/profile", response_model=UserProfile, dependencies=auth,
              responses={**tasks_responses, **_503_MODEL}, tags=["tasks"])
    async def profile(body: ProfileRequest) -> UserProfile:
        """Computed attributes (interests, style, price level, rhythm, lifecycle) plus a
        model-written summary whose claims cite the user's events.

        Model down, slow or loading: 503 with Retry-After (the summary is the model's job);
        send `use_llm=false` for the computed profile with a `[template]` summary."""
        as_of = _parse_as_of(body.as_of)
        uid = await state.check_user(body.dataset, body.user_id)
        pred = await state.run_task("/v1/profile", lambda svc: svc.profile(body.dataset, uid, as_of=as_of),
                                    use_llm=body.use_llm, fallback=False, task="the profile summary",
                                    hint="Retry later, or send use_llm=false for the computed profile "
                                    "with a template summary.")
        pred.user_id = body.user_id
        return pred

    @app.post("/v1/sentiment", response_model=SentimentResponse, dependencies=auth,
              responses=ERROR_RESPONSES, tags=["tasks"])
    async def sentiment(body: SentimentRequest) -> SentimentResponse:
        """Polarity (and optionally aspects) of each review text, in request order. Text is
        cleaned (HTML, personal data, instruction-like sentences) before the model sees it.

        Model down, slow or loading: 200, each text judged by the lexicon baseline
        (`source="lexicon"`, its `meta.degraded=true`), and the batch `meta.degraded=true`."""
        texts = body.texts
        if len(texts) > s.max_sentiment_texts:
            raise ApiError(413, f"{len(texts)} texts exceed the limit of {s.max_sentiment_texts} per request "
                           "(SHOPLENS_MAX_SENTIMENT_TEXTS)", code="too_many_texts", param="texts")
        for i, t in enumerate(texts):
            if len(t) > s.max_text_chars:
                raise ApiError(413, f"text of {len(t)} characters exceeds {s.max_text_chars} "
                               "(SHOPLENS_MAX_TEXT_CHARS)", code="text_too_long", param=f"texts[{i}]")
        watch = ModelWatch(state.model)
        model: ChatModel | None = None
        why = "model disabled by the caller"
        if body.use_llm:
            try:
                model = await watch.get()
            except ModelUnavailableError as e:
                why = f"model unavailable: {e}"
        sha = state.runtime.model_sha256
        done: dict[int, SentimentResult | SentimentFailure] = {}
        try:
            async with asyncio.timeout(s.request_timeout_s):
                await SentimentAnalyzer(model, model_sha256=sha, unavailable_reason=why).analyze_batch(
                    texts, aspects=body.aspects, on_done=done.__setitem__)
        except TimeoutError:  # the rest of the batch from the lexicon, labelled
            lex = SentimentAnalyzer(None, unavailable_reason=f"model did not answer within {s.request_timeout_s:g} s")
            for i in range(len(texts)):
                if i not in done:
                    try:
                        done[i] = await lex.analyze(texts[i], aspects=False)
                    except ValueError as e:
                        done[i] = SentimentFailure(index=i, error=str(e))
        results = [done[i] for i in range(len(texts))]
        ok = [r for r in results if isinstance(r, SentimentResult)]
        reasons = [r.meta.degraded_reason for r in ok if r.meta.degraded and r.meta.degraded_reason]
        meta = SentimentBatchMeta(degraded=bool(reasons), degraded_reason=reasons[0] if reasons else None,
                                  n=len(texts), by_model=sum(r.source == "model" for r in ok),
                                  by_lexicon=sum(r.source == "lexicon" for r in ok), failed=len(texts) - len(ok))
        if meta.degraded:
            state.metrics.degraded.labels("/v1/sentiment").inc()
        return SentimentResponse(results=results, meta=meta)

    @app.post("/v1/audience", response_model=AudiencePrediction, dependencies=auth,
              responses=ERROR_RESPONSES, tags=["tasks"])
    async def audience(body: AudienceRequest) -> AudiencePrediction:
        """The `n` users most likely to buy `item_id` (or to answer `campaign_text`), ranked by
        retrieval fusion; the model scores and explains the top few. User ids are as stored
        (pseudonymised when SHOPLENS_PSEUDONYMISE_KEY is set).

        Model down, slow or loading: 200 ranked by retrieval alone with template reasons,
        `meta.degraded=true` and the reason."""
        if not body.item_id and not body.campaign_text:
            raise ApiError(422, "give item_id or campaign_text", code="missing", param="item_id")
        await state.ensure_indexes(body.dataset)
        warm = state.tasks(None, use_model=False)
        await asyncio.to_thread(warm.audience_index, body.dataset)  # built once, off the event loop
        return await state.run_task("/v1/audience", lambda svc: svc.audience(
            body.dataset, item_id=body.item_id, campaign_text=body.campaign_text, n=body.n),
            use_llm=body.use_llm, fallback=True)

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
        state.forget_task_caches(body.dataset)
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
                state.forget_task_caches(dataset)
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
